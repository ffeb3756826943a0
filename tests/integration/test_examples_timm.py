"""examples/timm_model.py at toy size, run as a user runs it (in timm's own venv: `.ci/run`; skipped without timm).
Without timm the script itself stops with one sentence; that is checked in the main suite's venv, where timm is absent.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "timm_model.py"


def run(*args, cwd):
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timm
@pytest.mark.parametrize("model,convs", [("repvgg_a0", 22)])  # the count of test_timm.py's MODELS
def test_timm_example_converts_searches_and_trains(tmp_path, model, convs):
    pytest.importorskip("timm")
    proc = run("--model", model, "--toy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{model}: {convs} target convs" in proc.stdout, proc.stdout
    top1 = re.search(r"RepOpt top-1 (\d+\.\d+) %", proc.stdout)
    assert top1 and 0 <= float(top1.group(1)) <= 100, proc.stdout


def test_timm_example_without_timm_says_so_in_one_sentence(tmp_path):
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("timm is installed here")
    proc = run("--toy", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == \
        "This example needs timm, which is not installed: pip install timm", proc.stderr
