"""Impossible settings on the command line: exit code 2 and one sentence, refused before the run directory exists.
More cases (unknown --arch, --epochs 0, a batch larger than the dataset, an unwritable --out) are in test_train.py;
the cases here are in reliability_cases_run.py.
"""
import os
import subprocess
import sys

import pytest
from reliability_kit import cases, run_case


@pytest.mark.parametrize("case", cases("cli"), ids=lambda c: c.id)
def test_cli_refuses_impossible_settings(case, tmp_path):
    code, err, line = run_case(case, tmp_path)
    assert code == 2, err
    assert all(word in line for word in case.expect), line
    assert case.usage or err.count("\n") == 1, err  # argparse prints its usage lines first
    assert not (tmp_path / "run").exists()


def test_the_exit_status_reaches_the_shell(tmp_path):
    done = subprocess.run([sys.executable, "-m", "repopt", "scales", "show", str(tmp_path / "none.safetensors")],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stdout == ""
    missing = tmp_path / "none.safetensors"
    assert done.stderr.splitlines() == [f"repopt scales: error: scales file '{missing}' does not exist"]
