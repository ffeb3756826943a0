"""bench/experiments: the run list of the Fashion-MNIST experiments parses as repopt commands and its inputs are
made by earlier runs; the tables come from the runs' files; bench/stats.py's paired differences."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "experiments")]

import fmnist  # noqa: E402
import plots  # noqa: E402
import stats  # noqa: E402
import tables  # noqa: E402


def test_paired_statistics():
    p = stats.paired([90.0, 91.0, 89.0], [88.0, 91.0, 90.0])
    assert p["mean"] == pytest.approx(1 / 3) and (p["ahead"], p["tied"], p["behind"]) == (1, 1, 1)
    assert p["se"] == pytest.approx(0.8819171, abs=1e-6)  # stdev of (2, 0, -1) / sqrt(3)
    assert stats.mean_se([1.0, 2.0, 3.0]) == "2.00 ± 0.58" and stats.paired_cell(p) == "+0.33 ± 0.88 (1/1/1)"
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired([1.0], [1.0, 2.0])


def test_every_run_is_a_valid_command_whose_inputs_some_run_makes(tmp_path):
    from repopt.app.cli import build_parser

    jobs = fmnist.jobs(tmp_path)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    parser = build_parser()
    made = set()
    for j in jobs:
        args = parser.parse_args(j.argv)  # a misspelt flag fails here, not hours into the experiments
        assert args.command == j.argv[0]
        for need in j.needs:
            assert any(need.startswith(m) for m in made), f"{j.name} needs {need}, which no earlier run makes"
        made.add(j.name + "/" if not j.stdout else j.stdout)
    assert {j.argv[0] for j in jobs} == {"pipeline", "train", "search", "quantize", "analyze"}


def _report(path: Path, seed: int, top1: dict, hs: float) -> None:
    path.mkdir(parents=True)
    results = [{"method": m, "top1": v} for m, v in top1.items()]
    (path / "report.json").write_text(json.dumps({"hs_top1": hs, "seed": seed, "results": results}))


def test_tables_read_the_runs(tmp_path, capsys):
    for s, (a, b, c) in zip(fmnist.SEEDS, [(90.0, 89.0, 80.0), (91.0, 91.5, 70.0), (92.0, 90.0, 75.0)]):
        _report(tmp_path / "depth" / fmnist.DEEPEST / f"s{s}", s, {"repopt": a, "repvgg": b, "plain": c}, 50.0)
        run = tmp_path / "ablation" / "ones" / f"s{s}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"top1": a - 1}))
    tables.depth(tmp_path)
    tables.ablations(tmp_path)
    out = capsys.readouterr().out
    assert f"| {fmnist.DEEPEST} | repopt | 90.00 / 91.00 / 92.00 | 91.00 ± 0.58 |" in out
    assert f"| {fmnist.DEEPEST} | repvgg | 89.00 / 91.50 / 90.00 | 90.17 ± 0.73 | +0.83 ± 0.73 (2/0/1) |" in out
    assert "| all scales 1 (no search) | 89.00 / 90.00 / 91.00 | 90.00 ± 0.58 | +1.00 ± 0.00 (3/0/0) | 77.59 |" in out
    assert "| masks, no re-initialisation | - / - / - | - | - | 77.42 |" in out  # not run yet


def test_learning_rate_table_pairs_the_old_rate_with_the_recipe(tmp_path, capsys):
    for s, (a, b) in zip(fmnist.SEEDS, [(90.0, 89.0), (91.0, 91.5), (92.0, 90.0)]):
        _report(tmp_path / "depth" / fmnist.DEEPEST / f"s{s}", s, {"repopt": a, "repvgg": b, "plain": 10.0}, 50.0)
        for method, top1 in (("repopt", a - 10), ("repvgg", b - 1)):
            run = tmp_path / "lr" / f"{method}-lr{fmnist.OLD_LR}" / f"s{s}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"top1": top1}))
    tables.learning_rate(tmp_path)
    out = capsys.readouterr().out
    assert "| repopt | 0.025 | 90.00 / 91.00 / 92.00 | 91.00 ± 0.58 | +0.83 ± 0.73 (2/0/1) |" in out
    assert "| repopt | 0.1 | 80.00 / 81.00 / 82.00 | 81.00 ± 0.58 | -8.17 ± 0.73 (0/0/3) |" in out
    assert "repopt: lr 0.025 - lr 0.1, paired by seed: +10.00 ± 0.00 (3/0/0)" in out


def test_figure_points_come_from_the_run_files(tmp_path):
    for s, (a, b) in zip(fmnist.SEEDS, [(90.0, 89.0), (91.0, 91.5), (92.0, 90.0)]):
        _report(tmp_path / "depth" / "repopt_vgg_a0" / f"s{s}", s, {"repopt": a, "repvgg": b, "plain": 50.0}, 80.0)
        q = tmp_path / "int8" / "repopt_vgg_a0" / f"s{s}"
        q.mkdir(parents=True)
        (q / "repvgg-per-tensor.json").write_text(json.dumps({"fp32_top1": b, "int8_top1": b - 2.0 - s}))
    depth = plots.depth_points(tmp_path)
    assert depth["repopt"] == [(22, 91.0, pytest.approx(0.57735, abs=1e-5))] and depth["plain"][0][1:] == (50.0, 0.0)
    drops = plots.int8_drops(tmp_path)
    assert drops["repvgg"] == [(22, 3.0, pytest.approx(0.57735, abs=1e-5))] and drops["repopt"] == []
