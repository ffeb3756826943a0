"""`repopt bench --quick --json` runs and reports every figure: keys and types only, never timings (they depend on
the machine and its load)."""
from __future__ import annotations

import json
import math

from repopt.app.bench import KEYS
from repopt.app.cli import main


def test_quick_bench_reports_every_key(capsys):
    assert main(["bench", "--quick", "--json", "--threads", "1", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("optimizer_step_ratio", "optimizer_extra_state_fraction", "train_step_ratio_vs_plain",
                "train_throughput_ratio_vs_repvgg", "peak_memory_ratio_vs_repvgg"):
        assert key in KEYS
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
        assert isinstance(result["met"][key], bool), key
    env = result["environment"]
    assert env["device"].startswith("cpu") and env["torch"] and env["threads"] == 1
    d = result["details"]
    assert d["optimizer"]["torch_sgd"]["median_s"] > 0 and d["optimizer"]["repopt_sgd"]["median_s"] > 0
    from repopt.optim import native

    # the default path on CPU is the native kernel where it builds, and then the eager path is timed beside it
    # (the path each optimizer recorded in its last timed step, not the one it was asked for)
    assert d["optimizer"]["path"] == ("native" if native.available() else "blocks")
    assert ("repopt_sgd_eager" in d["optimizer"]) == native.available()
    a = d["adaptive_optimizers"]
    assert a["adamw_ratio"] > 0 and a["lion_ratio"] > 0
    assert a["path"] == a["lion_path"] == ("native" if native.available() else "eager")
    assert {"plain", "repopt", "repvgg"} <= set(d["training"][0])
    assert d["memory"][0]["repopt"]["peak_bytes"] > 0


def test_bench_refuses_bad_repeats(capsys):
    assert main(["bench", "--quick", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["bench", "--quick", "--memory-repeats", "0"]) == 2
    assert "--memory-repeats" in capsys.readouterr().err


def test_an_unwritable_save_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    """--save is checked first: before issue 12 a missing folder surfaced only after the suite (minutes) had run."""
    import repopt.app.bench as bench

    def measured(*args, **kwargs):
        raise AssertionError("the suite ran before --save was checked")

    monkeypatch.setattr(bench, "run_suite", measured)
    for dest, why in ((tmp_path / "no" / "b.json", "No such file or directory"), (tmp_path, "it is a folder")):
        assert main(["bench", "--quick", "--save", str(dest)]) == 2
        assert capsys.readouterr().err == f"repopt bench: error: {dest} cannot be written ({why}); nothing was done\n"
    assert list(tmp_path.iterdir()) == []
