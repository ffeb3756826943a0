"""Data, command-line and training-fault cases of issue 7 (see reliability_kit.Case and reliability_cases.py)."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import torch
from formats import _dump, write_cifar, write_folder
from reliability_cases import _half, _model_file
from reliability_kit import FAST, RunsCode, case, disk_full, faulty_loss
from reliability_kit import STEPS_PER_EPOCH as STEPS


# ---- data (all through `repopt train`, refused before the run directory exists) --------------------------------
def _train_on(dataset: str, data_dir: Path, d: Path) -> list[str]:
    return ["train", "--method", "plain", "--dataset", dataset, "--data-dir", str(data_dir), *FAST, "--quiet",
            "--out", str(d / "run")]


def _cifar(d: Path) -> Path:
    write_cifar(d / "cifar", "cifar10", style=2)
    return d / "cifar" / "cifar-10-batches-py"


@case("data", "CIFAR-10 directory that does not exist", "/nonexistent/cifar",
      tested_in="tests/test_train.py::test_cli_refuses_bad_input_with_one_sentence")
def data_missing_cifar_dir(ws, d):
    return _train_on("cifar10", Path("/nonexistent/cifar"), d)


@case("data", "image-folder directory that does not exist", "nowhere", "does not exist")
def data_missing_folder_dir(ws, d):
    return _train_on("folder", d / "nowhere", d)


@case("data", "CIFAR-10 with a truncated test_batch", "test_batch is truncated")
def data_cifar_truncated(ws, d):
    _half(_cifar(d) / "test_batch")
    return _train_on("cifar10", d / "cifar", d)


@case("data", "CIFAR-10 with random bytes as data_batch_2", "data_batch_2", "not a valid pickle")
def data_cifar_garbage(ws, d):
    (_cifar(d) / "data_batch_2").write_bytes(np.random.default_rng(1).bytes(3000))
    return _train_on("cifar10", d / "cifar", d)


@case("data", "CIFAR-10 with a label 10 (classes are 0..9)", "test_batch", "labels must lie in [0, 10)")
def data_cifar_labels(ws, d):
    _dump({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 10, 2]}, _cifar(d) / "test_batch", 2)
    return _train_on("cifar10", d / "cifar", d)


@case("data", "CIFAR-10 pickle holding code (os.system)", "data_batch_1", "system", "refused")
def data_cifar_evil(ws, d):
    (_cifar(d) / "data_batch_1").write_bytes(pickle.dumps({"data": RunsCode(d), "labels": []}, protocol=2))
    return _train_on("cifar10", d / "cifar", d)


@case("data", "CIFAR-10 folder missing data_batch_3", "missing data_batch_3")
def data_cifar_missing_file(ws, d):
    (_cifar(d) / "data_batch_3").unlink()
    return _train_on("cifar10", d / "cifar", d)


@case("data", "image folder with an empty class folder (train/dog)", "dog holds no images")
def data_folder_empty_class(ws, d):
    write_folder(d / "imgs")
    shutil.rmtree(d / "imgs" / "train" / "dog")
    (d / "imgs" / "train" / "dog").mkdir()
    return _train_on("folder", d / "imgs", d)


@case("data", "image folder with a broken PNG", "0.png could not be read")
def data_folder_broken_image(ws, d):
    write_folder(d / "imgs")
    (d / "imgs" / "train" / "cat" / "0.png").write_bytes(b"\x89PNG broken")
    return _train_on("folder", d / "imgs", d)


# ---- command line ----------------------------------------------------------------------------------------------
def _plain(d: Path, *args: str) -> list[str]:
    return ["train", "--method", "plain", *FAST, "--quiet", "--out", str(d / "run"), *args]


for _args, _name, _expect, _where in [
    (["--arch", "resnet50"], "unknown --arch", ("unknown model 'resnet50'",), "tests/test_train.py"),
    (["--epochs", "0"], "`--epochs 0`", ("--epochs must be at least 1",), "tests/test_train.py"),
    (["--batch-size", "5000"], "batch larger than the dataset", ("larger than the 1437",), "tests/test_train.py"),
    (["--batch-size", "0"], "`--batch-size 0`", ("--batch-size", "must be positive"), None),
    (["--batch-size", "100", "--accumulate", "3"], "batch not divisible by --accumulate", ("divisible",), None),
    (["--epochs", "-3"], "`--epochs -3`", ("--epochs must be at least 1",), None),
    (["--lr", "nan"], "`--lr nan`", ("--lr must be a finite number",), None),
    (["--lr", "-0.1"], "`--lr -0.1`", ("--lr must be a finite number > 0",), None),
    (["--weight-decay", "-1"], "`--weight-decay -1`", ("--weight-decay",), None),
    (["--label-smoothing", "1.5"], "`--label-smoothing 1.5`", ("--label-smoothing",), None),
    (["--ema", "2"], "`--ema 2`", ("--ema is a decay",), None),
    (["--image-size", "0"], "`--image-size 0`", ("image_size must be a positive integer",), None),
    (["--device", "tpu"], "unknown --device", ("unknown device 'tpu'",), None),
]:
    def _setup(ws, d, _args=_args):
        return _plain(d, *_args)
    _setup.__name__ = "cli" + "".join(a.replace("-", "_").replace(".", "_") for a in _args[:2])
    case("cli", _name, *_expect, tested_in=_where and f"{_where}::test_cli_refuses_bad_input_with_one_sentence")(
        _setup)


for _flag, _value in [("--method", "nope"), ("--dataset", "svhn"), ("--optimizer", "sgdd")]:
    def _setup(ws, d, _flag=_flag, _value=_value):
        return _plain(d, _flag, _value)
    _setup.__name__ = f"cli_unknown_{_flag[2:]}"
    case("cli", f"unknown {_flag}", f"argument {_flag}: invalid choice: '{_value}'", usage=True)(_setup)


@case("cli", "--out below a regular file (not writable, even as root)", "not writable",
      tested_in="tests/test_train.py::test_unwritable_output_directory")
def cli_unwritable_out(ws, d):
    (d / "file").write_text("a file, not a folder")
    return ["train", "--method", "plain", *FAST, "--quiet", "--out", str(d / "file" / "run")]


@case("cli", "`eval --batch-size 0`", "batch_size must be at least 1")
def cli_eval_batch_zero(ws, d):
    return ["eval", str(_model_file(d / "done")), "--batch-size", "0"]


# ---- training faults ------------------------------------------------------------------------------------------
@case("training", "the loss turns NaN at step 3 of epoch 2 (injected)", f"step {STEPS + 3} (epoch 2)",
      "checkpoint.pt (epoch 1) is kept", fault=lambda: faulty_loss({3}, "nan"))
def train_nan_loss(ws, d):
    return ws.train_args(ws.copy_run(d / "run"))


@case("training", "the last update of epoch 2 makes the weights inf/NaN while every loss was finite (injected)",
      "became NaN or inf during epoch 2", "checkpoint.pt (epoch 1) is kept",
      fault=lambda: faulty_loss({STEPS - 1}, "inf_grad"))
def train_nan_weights(ws, d):
    return ws.train_args(ws.copy_run(d / "run"))


@case("training", "the disk fills up while epoch 2's checkpoint is written (injected: torch.save's error on /dev/full)",
      "checkpoint.pt could not be written", "previous file is left as it was", fault=lambda: disk_full(torch, "save"))
def train_disk_full(ws, d):
    return ws.train_args(ws.copy_run(d / "run"))


@case("training", "`--lr 1e6` (plain SGD diverges in epoch 1)", "the loss became", "no checkpoint had been written")
def train_huge_lr(ws, d):
    return _plain(d, "--lr", "1e6")
