"""What the reliability tests (tests/test_reliability_*.py) and the table of docs/reliability.md share: the case
registry, an in-process `repopt` runner that checks nothing on disk was lost, a workspace of valid files to spoil,
and fault injectors (NaN loss, overflowing gradients, a disk that fills up half-way through a write).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

MARKER = "PWNED"  # what the pickled code in the malicious files would create
FAST = ["--arch", "repopt_vgg_tiny", "--epochs", "2", "--image-size", "16", "--batch-size", "128"]
STEPS_PER_EPOCH = 1437 // 128  # digits: 1437 training images
MODEL_FILE = "model.safetensors"


class RunsCode:
    """Unpickling this runs a shell command: the payload of the malicious files."""

    def __init__(self, folder: Path):
        self.cmd = f"touch {folder / MARKER}"

    def __reduce__(self):
        return os.system, (self.cmd,)


# ---- running `repopt` ------------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`repopt ARGV` in this process: (exit code, stdout, stderr)."""
    from repopt.app.cli import main

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    # one thread: tiny trainings gain nothing from two, and on a busy 2-core machine two OpenMP threads per process
    # spin against the other processes (a step took 10x longer here)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """The `repopt CMD: error: ...` line (argparse prints its usage lines first)."""
    return next((ln for ln in reversed(err.splitlines()) if ln.startswith("repopt ")), err.strip())


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Leftovers of an interrupted atomic write (`.NAME.tmpPID` next to NAME)."""
    return sorted(p.name for p in folder.rglob(".*.tmp*"))


# ---- files to start from -----------------------------------------------------------------------------------------
class Workspace:
    """Built once per process: scales for two models, and a RepOpt run of repopt_vgg_tiny stopped after epoch 1 of
    2 (its checkpoint.pt is what a resumed run reads)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="repopt-reliability-"))
        atexit.register(shutil.rmtree, self.root, True)

    def _scales(self, arch: str) -> Path:
        import repopt
        from repopt.models import create

        scales = repopt.extract_scales(create(arch, mode="hs"))  # the HS init: valid, no search needed
        scales.metadata["arch"] = arch
        return repopt.save_scales(scales, self.root / f"{arch}.safetensors")

    @cached_property
    def scales(self) -> Path:
        return self._scales("repopt_vgg_tiny")

    @cached_property
    def small_scales(self) -> Path:
        return self._scales("repopt_vgg_small")

    def train_args(self, out: Path, *extra: str, quiet: bool = True) -> list[str]:
        """The command that started (and resumes) the workspace's run, into `out`; `extra` overrides."""
        return ["train", "--method", "repopt", "--scales", str(self.scales), *FAST, *(["--quiet"] * quiet),
                "--out", str(out), *extra]

    @cached_property
    def run(self) -> Path:
        import repopt.app.train as train_module

        out, real_save = self.root / "run", train_module.save_checkpoint

        def stop_after_first(path, payload):  # as if the machine went down right after epoch 1
            real_save(path, payload)
            raise KeyboardInterrupt

        train_module.save_checkpoint = stop_after_first
        try:
            assert run_cli(self.train_args(out))[0] == 130
        finally:
            train_module.save_checkpoint = real_save
        return out

    def copy_run(self, dest: Path) -> Path:
        return Path(shutil.copytree(self.run, dest))


_WORKSPACE: Workspace | None = None


def workspace() -> Workspace:
    global _WORKSPACE
    if _WORKSPACE is None:
        _WORKSPACE = Workspace()
    return _WORKSPACE


# ---- the cases -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    theme: str
    name: str
    setup: Callable[[Workspace, Path], list[str]]  # builds the bad files in a folder, returns the command line
    expect: tuple[str, ...]  # words the error line must hold
    tested_in: str | None = None  # another test file already proves this case
    usage: bool = False  # argparse refuses it: usage lines come before the error line
    fault: Callable[[], contextlib.AbstractContextManager] | None = None  # active while the command runs

    @property
    def id(self) -> str:
        return self.setup.__name__


CASES: list[Case] = []


def case(theme: str, name: str, *expect: str, tested_in: str | None = None, usage: bool = False, fault=None):
    def register(setup):
        CASES.append(Case(theme, name, setup, expect, tested_in, usage, fault))
        return setup
    return register


def cases(theme: str) -> list[Case]:
    import reliability_cases  # noqa: F401  (importing them registers the cases)
    import reliability_cases_run  # noqa: F401

    return [c for c in CASES if c.theme == theme and not c.tested_in]


def run_case(c: Case, folder: Path) -> tuple[int, str, str]:
    """(exit code, all of stderr, the error line). Asserts that every file under `folder` is as it was (byte for
    byte; the run's metrics log may gain a line), that only the run directory `folder/run` may have gained files
    (never weights), that no temp file is left behind, and that no pickled code ran."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = c.setup(workspace(), folder)
    before = {p: b for p, b in snapshot(folder).items() if p != folder / "run" / "metrics.jsonl"}
    with c.fault() if c.fault else contextlib.nullcontext():
        code, _, err = run_cli(argv)
    after = snapshot(folder)
    assert {p: after.get(p) for p in before} == before, f"{c.id}: a file was changed or removed"
    assert not temp_files(folder), f"{c.id}: temp files left: {temp_files(folder)}"
    new = [p for p in after if p not in before]
    assert all(folder / "run" in p.parents and p.name not in ("checkpoint.pt", "model.safetensors")
               for p in new), f"{c.id}: unexpected new files {new}"
    assert not (folder / MARKER).exists(), f"{c.id}: the pickled code ran"
    return code, err, error_line(err)


# ---- faults ------------------------------------------------------------------------------------------------------
class _InfGrad(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradients overflow, as fp16 does to a scaled loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@contextlib.contextmanager
def faulty_loss(steps: set[int], kind: str):
    """At these optimizer steps of a run (counted from 0 in this process), the training loss becomes NaN
    (kind 'nan') or stays finite with inf gradients (kind 'inf_grad')."""
    import torch.nn.functional as F

    real, calls = F.cross_entropy, itertools.count()

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if "label_smoothing" in kwargs and next(calls) in steps:  # the training loss, not evaluate()'s
            loss = loss * math.nan if kind == "nan" else _InfGrad.apply(loss)
        return loss

    F.cross_entropy = cross_entropy
    try:
        yield
    finally:
        F.cross_entropy = real


def full_disk_error(writer: str) -> Exception:
    """What each writer raises when the disk fills up: torch.save a RuntimeError (this text is what it printed
    writing to /dev/full), safetensors' save_file its own error (the text of its I/O errors), anything else OSError."""
    if writer == "save":
        return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    if writer == "save_file":
        from safetensors import SafetensorError

        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextlib.contextmanager
def disk_full(module, name: str, error: Exception | None = None):
    """`module.name(obj, path, ...)` (torch.save, safetensors' save_file) leaves half a file, then fails as a full
    disk does (with `error`, by default what that writer raises)."""
    real = getattr(module, name)

    def write(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise error or full_disk_error(name)

    setattr(module, name, write)
    try:
        yield
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def grad_scaler_on_cpu():
    """The trainer uses a GradScaler only for fp16 on CUDA; force it on so its skip counting runs on CPU."""
    import repopt.app.train as train_module

    real = train_module.uses_grad_scaler
    train_module.uses_grad_scaler = lambda cfg, device: True
    try:
        yield
    finally:
        train_module.uses_grad_scaler = real


# ---- scenarios that succeed (the table reports what they did) ----------------------------------------------------
def amp_skipped_steps(ws: Workspace, folder: Path, steps=(1, 4, 6)) -> dict:
    """Resume the workspace run with a GradScaler and overflowing gradients at these steps of epoch 2."""
    from repopt.app.metrics import read_metrics

    out = ws.copy_run(folder / "run")
    with grad_scaler_on_cpu(), faulty_loss(set(steps), "inf_grad"):
        code, stdout, err = run_cli(ws.train_args(out, quiet=False))
    result = json.loads((out / "result.json").read_text()) if code == 0 else {}
    return {"code": code, "stdout": stdout, "stderr": err, "result": result,
            "metrics": read_metrics(out / "metrics.jsonl")}


CRASH_COMMAND = ["train", "--method", "plain", "--arch", "repopt_vgg_tiny", "--epochs", "3", "--image-size", "16",
                 "--batch-size", "128", "--quiet"]


def kill_and_resume(folder: Path, timeout: float = 300) -> dict:
    """Start the same training twice (OMP_NUM_THREADS=1 both); kill -9 one of them in epoch 2, once its first
    checkpoint exists, and re-run its command. Returns what happened, and whether the final weights are equal."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "repopt", *CRASH_COMMAND, "--out", str(folder / name)]

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "straight.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
        straight = subprocess.Popen(command("straight"), env=env, stdout=log, stderr=log)
    victim = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = folder / "killed" / "checkpoint.pt", time.monotonic() + timeout
    try:
        while not ckpt.exists():
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        time.sleep(0.3)  # well into epoch 2 (an epoch takes seconds)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed = {"returncode": victim.returncode, "epoch": torch.load(ckpt, weights_only=True)["epoch"],
                  "metrics": (folder / "killed" / "metrics.jsonl").read_text().splitlines(),
                  "model_written": (folder / "killed" / MODEL_FILE).exists(),
                  "temp_files": temp_files(folder / "killed")}
        again = subprocess.run(command("killed"), check=False, env=env, capture_output=True, text=True,
                               timeout=timeout)
        assert again.returncode == 0, again.stderr[-2000:]
        assert straight.wait(timeout=timeout) == 0, (folder / "straight.log").read_text()[-2000:]
    finally:  # never leave a training behind
        for p in (victim, straight):
            if p.poll() is None:
                p.kill()
                p.wait()
    a, b = load_file(folder / "straight" / MODEL_FILE), load_file(folder / "killed" / MODEL_FILE)
    return {"killed": killed, "metrics": (folder / "killed" / "metrics.jsonl").read_text().splitlines(),
            "equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "tensors": len(a)}
