"""bench/experiments' convergence study (issue 22): the run list parses as repopt commands, the tables compute what
they say from the run files, and gpu_science.sh --cpu runs the whole machinery (calibrate, plan, run, summarise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path[:0] = [str(BENCH), str(BENCH / "experiments")]

import convergence  # noqa: E402
import convergence_tables  # noqa: E402
import gpu_science  # noqa: E402

STUDY = convergence.Study(lengths=(4, 2), seeds=(0, 1, 2))


def test_every_run_is_a_valid_command_whose_inputs_an_earlier_run_makes(tmp_path):
    from repopt.app.cli import build_parser

    jobs = convergence.jobs(tmp_path)
    parser = build_parser()
    made = set()
    for j in jobs:
        assert parser.parse_args(j.argv).command == j.argv[0]
        for need in j.needs:
            assert any(need.startswith(m) for m in made), f"{j.name} needs {need}, which no earlier run makes"
        made.add(j.name + "/")
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)) and names[0].startswith("hs/")
    st = convergence.DEFAULT
    assert len(jobs) == len(st.nets) * len(st.seeds) * (1 + len(st.lengths) * len(st.methods)) + 3 * len(st.seeds)


def test_a_root_holding_another_study_is_refused(tmp_path):
    STUDY.save(tmp_path)
    assert convergence.Study.load(tmp_path) == STUDY
    with pytest.raises(SystemExit, match="records another study"):
        convergence.DEFAULT.save(tmp_path)


def _run(root: Path, name: str, top1s: list[float], images_per_epoch: int = 1000) -> None:
    """A finished run whose test top-1 after each epoch is top1s (every epoch tested)."""
    d = root / name
    d.mkdir(parents=True)
    lines = [{"epoch": e + 1, "test_top1": t, "images_per_s": images_per_epoch / 2.0, "epoch_seconds": 2.0}
             for e, t in enumerate(top1s)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (d / "result.json").write_text(json.dumps({"top1": top1s[-1]}))


def test_tables_pair_by_seed_judge_convergence_and_time_to_accuracy(tmp_path, capsys):
    STUDY.save(tmp_path)
    net = STUDY.deepest
    for s in STUDY.seeds:
        _run(tmp_path, convergence.sched_dir(net, 4, "repvgg", s), [50, 70, 80, 80 + s])
        _run(tmp_path, convergence.sched_dir(net, 4, "repopt", s), [60, 81, 81.1 + s, 81.2 + s])
        _run(tmp_path, convergence.sched_dir(net, 2, "repopt", s), [70, 81.0 + s])
        _run(tmp_path, convergence.sched_dir(net, 4, "plain", s), [10, 10, 10, 10])
    (tmp_path / "throughput.json").write_text(json.dumps(
        {"nets": {net: {"repopt": 0.002, "repvgg": 0.004, "plain": 0.001}}}))
    out: dict = {}
    convergence_tables.tables(tmp_path, out)
    text = capsys.readouterr().out
    # repopt - repvgg at 4 epochs: 1.2 on every seed
    assert f"| {net} | 4 | repvgg | 80.00 / 81.00 / 82.00 | 81.00 ± 0.58 | +1.20 ± 0.00 (3/0/0) |" in text
    c = out["convergence"][net]
    # last fifth of 4 epochs: from epoch 3 (the last test at or before 3.2) to epoch 4
    assert c["repvgg"]["moved_last_fifth"] == pytest.approx([0.0, 1.0, 2.0])
    assert c["repopt"]["gain_longest_minus_shorter"]["mean"] == pytest.approx(0.2)
    assert c["repopt"]["converged"] == "yes" and c["repvgg"]["converged"] == "no"
    # repopt reaches repvgg's final (80, 81, 82) after 2,000 / 2,000 / 3,000 images; plain never
    t = out["time_to_accuracy"][net]["4"]
    assert t["repopt"]["images_per_seed"] == [2000, 2000, 3000]
    assert t["repvgg"]["images_per_seed"] == [3000, 4000, 4000] and t["plain"]["images_per_seed"] == [None] * 3
    assert f"| {net} | 4 | repopt | 2.00 / 2.00 / 3.00 | 2.33 ± 0.33 | 5 | 3/3 |" in text  # 2,333 x 0.002 s
    assert f"| {net} | 4 | plain | - / - / - | - | - | 0/3 |" in text
    assert "| all scales 1 (no search) | - / - / - | - | - |" in text  # not run yet: a dash, not an error


def test_figure_is_drawn_from_the_run_files(tmp_path):
    pytest.importorskip("matplotlib")
    import convergence_plot

    STUDY.save(tmp_path)
    for s in STUDY.seeds:
        _run(tmp_path, convergence.sched_dir(STUDY.deepest, 4, "repopt", s), [60, 70, 80, 81 + s])
    assert convergence_plot.mean_curve(tmp_path, STUDY, STUDY.deepest, 4, "repopt")[-1] == (4000, 82.0)
    convergence_plot.draw(tmp_path, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_the_gpu_plan_fits_the_budget_it_is_given():
    cost = {net: {"repopt": 1e-5, "repvgg": 2e-5, "plain": 1e-5} for net in gpu_science.gpu_study(None).nets}
    base = gpu_science.gpu_study(None)
    generous = gpu_science.plan(base, cost, 60000, 10000, 6, 1e9)
    assert generous.lengths == (45, 15, 5)
    tight = gpu_science.plan(base, cost, 60000, 10000, 6, 200.0)
    assert gpu_science.predict(tight, cost, 60000, 10000, 6) <= 200.0 and tight.longest < 45


def test_gpu_science_cpu_mode_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(["bash", str(BENCH / "experiments" / "gpu_science.sh"), "--cpu", "--root", str(tmp_path),
                        "--budget-s", "40"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    plan = lines[0]["plan"]
    assert plan["lengths"] == [2, 1] and plan["device"] == "cpu"
    summary = lines[-1]["summary"]
    runs = [line for line in lines if "run" in line]
    assert summary["finished"] == len(runs) >= 1 and summary["failed"] == []
    assert summary["tables"]["study"]["lengths"] == [2, 1] and (tmp_path / "tables.md").is_file()


def test_the_published_tables_are_the_printout_of_the_kept_run_files(capsys):
    """docs/results.md section 10 holds what convergence_tables.py prints from docs/runs/convergence: no cell typed."""
    kept = ROOT / "docs" / "runs" / "convergence"
    convergence_tables.tables(kept, {})
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| repopt_vgg_")]
    doc = (ROOT / "docs" / "results.md").read_text()
    assert len(rows) >= 2 * 3 * 3 and all(row in doc for row in rows)
