"""Faults during training, injected into a resumed run (reliability_kit.faulty_loss / disk_full): the run stops with
the step number and leaves the last good checkpoint byte for byte as it was. With a GradScaler, skipped steps are
counted and reported. Cases: reliability_cases_run.py.
"""
import math

import pytest
from reliability_kit import amp_skipped_steps, cases, run_case, workspace


@pytest.mark.parametrize("case", cases("training"), ids=lambda c: c.id)
def test_a_fault_stops_the_run_and_keeps_the_last_checkpoint(case, tmp_path):
    code, err, line = run_case(case, tmp_path)  # checks checkpoint.pt is unchanged and no weights were written
    assert code == 2 and err.count("\n") == 1, err
    assert all(word in line for word in case.expect), line


def test_grad_scaler_skipped_steps_are_counted_and_reported(tmp_path):
    # On CPU the trainer autocasts to bf16 and uses no GradScaler (fp16 on CUDA does); forcing it on runs the same
    # counting code. The overflowing gradients are injected at steps 1, 4 and 6 of epoch 2.
    run = amp_skipped_steps(workspace(), tmp_path)
    assert run["code"] == 0, run["stderr"]
    assert run["result"]["skipped_steps"] == 3 and run["metrics"][-1]["skipped_steps"] == 3
    assert "(3 steps skipped by the AMP GradScaler so far)" in run["stdout"]
    assert "; 3 steps skipped by the AMP GradScaler (inf/NaN gradients)" in run["stdout"]
    assert all(math.isfinite(row["train_loss"]) for row in run["metrics"])
