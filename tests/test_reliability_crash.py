"""Crash safety: kill -9 in the middle of an epoch and re-run the same command; a write that fails half-way.
Resume equality in-process (an exception after a checkpoint) is in test_train.py; this is a real SIGKILL.
"""
import errno
import os

import pytest
import safetensors.torch
import torch
from reliability_kit import disk_full, kill_and_resume, temp_files

import repopt
from repopt.app.checkpoint import CheckpointError, save_checkpoint, save_model
from repopt.models import create


def test_kill_9_mid_epoch_then_the_same_command_resumes_to_the_same_weights(tmp_path):
    run = kill_and_resume(tmp_path)
    killed = run["killed"]
    assert killed["returncode"] == -9 and killed["epoch"] == 1 and len(killed["metrics"]) == 1
    assert not killed["model_written"]
    assert len(run["metrics"]) == 3 and run["metrics"][0] == killed["metrics"][0]  # resumed, epoch 1 not redone
    assert run["equal"] and run["tensors"] > 0


def _checkpoint(path):
    save_checkpoint(path, {"epoch": 1, "w": torch.arange(100.0)})


def _model(path):
    save_model(path, create("repopt_vgg_tiny", num_classes=10), {"arch": "repopt_vgg_tiny"})


def _scales(path):
    repopt.save_scales(repopt.extract_scales(create("repopt_vgg_tiny", mode="hs")), path)


@pytest.mark.parametrize("full", ["as the writer fails", "as OSError"])
@pytest.mark.parametrize("write, writer, error", [
    (_checkpoint, (torch, "save"), CheckpointError),
    (_model, (safetensors.torch, "save_file"), CheckpointError),
    (_scales, (safetensors.torch, "save_file"), repopt.ScalesError),
], ids=["checkpoint", "model", "scales"])
def test_a_write_that_fails_half_way_keeps_the_previous_file(tmp_path, write, writer, error, full):
    path = tmp_path / "file"
    write(path)
    before = path.read_bytes()
    oserror = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full == "as OSError" else None
    with disk_full(*writer, oserror), pytest.raises(error, match=r"file could not be written \(.+\); the previous"):
        write(path)
    assert path.read_bytes() == before and not temp_files(tmp_path)
