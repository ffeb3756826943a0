"""bench/experiments/transfer.py: every run is a valid repopt command whose inputs an earlier run makes, the rows
compare what issue 21 asks for, and the table is read from the runs' files with paired differences."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "experiments")]

import transfer  # noqa: E402


def test_every_run_is_a_valid_command_whose_inputs_an_earlier_run_makes(tmp_path):
    from repopt.app.cli import build_parser

    jobs = transfer.jobs(tmp_path)
    assert len({j.name for j in jobs}) == len(jobs)
    parser, made = build_parser(), set()
    for j in jobs:
        args = parser.parse_args(j.argv)  # a misspelt flag fails here, not hours into the experiment
        for need in j.needs:
            assert any(need.startswith(m) for m in made), f"{j.name} needs {need}, which no earlier run makes"
        made.add(j.name + "/" if not j.stdout else j.stdout)
        if j.argv[0] == "train":
            pre = j.name.startswith("pre/")
            assert args.classes == ([0, 1, 2, 3, 4] if pre else [5, 6, 7, 8, 9])
            assert (args.train_subset, args.init_from is not None) == ((None, False) if pre else
                                                                       (1000, j.name.startswith("ft")))
            assert (args.recipe == "finetune") == j.name.startswith("ft/")
    ft = {j.name: j.argv for j in jobs if j.name.startswith("ft/") and j.name.endswith("/s0")}
    source = lambda argv: argv[argv.index("--init-from") + 1]  # noqa: E731
    # with and without the multipliers: the same RepOpt-trained weights; RepVGG from its own multi-branch weights
    assert source(ft["ft/repopt/s0"]) == source(ft["ft/plain/s0"]) != source(ft["ft/repvgg/s0"])
    assert "--scales" in ft["ft/repopt/s0"] and "--scales" not in ft["ft/plain/s0"]
    assert {j.argv[0] for j in jobs} == {"search", "train", "quantize"}


def test_the_table_pairs_each_row_with_repopt_fine_tuned(tmp_path):
    study = transfer.Study(seeds=(0, 1))
    values = {"ft/repopt": (90.0, 92.0), "ft/plain": (89.0, 90.0), "scratch/plain": (80.0, None)}
    for row, tops in values.items():
        for s, top1 in zip(study.seeds, tops):
            if top1 is None:
                continue
            (tmp_path / row / f"s{s}").mkdir(parents=True)
            (tmp_path / row / f"s{s}" / "result.json").write_text(json.dumps({"deployed_top1": top1}))
    (tmp_path / "int8" / "ft" / "repopt").mkdir(parents=True)
    (tmp_path / "int8" / "ft" / "repopt" / "s0-per-tensor.json").write_text(json.dumps({"int8_top1": 88.0}))
    lines = {line.split(" | ")[0]: line for line in transfer.table(tmp_path, study).splitlines()}
    assert lines["| ft/repopt"] == "| ft/repopt | 91.00 ± 1.00 | - | - | 88.00 ± 0.00 (n=1) |"
    assert lines["| ft/plain"] == "| ft/plain | 89.50 ± 0.50 | -1.50 ± 0.50 (0/0/2) | - | - |"
    assert lines["| scratch/plain"].startswith("| scratch/plain | 80.00 ± 0.00 (n=1) | -10.00")
    assert lines["| ft/repvgg"] == "| ft/repvgg | - | - | - | - |"


def test_a_root_holding_another_study_is_refused(tmp_path):
    transfer.Study().save(tmp_path)
    with pytest.raises(SystemExit, match="records another study"):
        transfer.Study(subset=500).save(tmp_path)


def test_the_figure_is_drawn_from_the_runs_files(tmp_path):
    pytest.importorskip("matplotlib")
    import transfer_plot

    study = transfer.Study(seeds=(0, 1))
    study.save(tmp_path)
    for row, top1 in (("ft/repopt", (50.0, 90.0)), ("scratch/plain", (20.0, 40.0))):
        for s in study.seeds:
            run = tmp_path / row / f"s{s}"
            run.mkdir(parents=True)
            lines = [{"epoch": e + 1, "images_per_s": 100.0, "epoch_seconds": 10.0, "test_top1": t + s}
                     for e, t in enumerate(top1)]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines))
            (run / "result.json").write_text(json.dumps({"top1": top1[-1] + s}))
    # the mean over seeds, at the images seen by each test
    assert transfer_plot.mean_curve(tmp_path, study, "ft/repopt") == [(1000, 50.5), (2000, 90.5)]
    assert transfer_plot.mean_curve(tmp_path, study, "ft/plain") == []
    transfer_plot.draw(tmp_path, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_published_table_is_the_printout_of_the_kept_run_files():
    """docs/results.md section 11 holds what transfer.py's table prints from docs/runs/transfer: no cell typed."""
    root = Path(__file__).resolve().parents[1]
    kept = root / "docs" / "runs" / "transfer"
    printed = transfer.table(kept, transfer.Study.load(kept)).splitlines()
    rows = [line for line in printed if line.startswith(("| ft", "| scratch", "ft", "pre/"))]
    doc = (root / "docs" / "results.md").read_text()
    assert len(rows) == len(transfer.ROWS) + len(transfer.DIAGNOSTIC) + len(transfer.PAIRS) + 2
    assert all(row in doc for row in rows), [row for row in rows if row not in doc]
    assert "(n=" not in "\n".join(rows[:len(transfer.ROWS)])  # every main row holds every seed
