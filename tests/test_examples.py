"""The one-page scripts in examples/ run at toy size and do what they say (so they cannot rot): each is run as a
user runs it, in a subprocess, and its output or files are checked. The timm example's test is in
tests/integration/test_examples_timm.py (it needs timm)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import repopt
from test_scales import released_keys

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TESTED = {"own_training_loop.py": "here", "ddp_torchrun.py": "here", "finetune_released_scales.py": "here",
          "timm_model.py": "tests/integration/test_examples_timm.py"}


def run(*args, cwd) -> subprocess.CompletedProcess:
    """An example as a user runs it: a fresh interpreter, one thread (the tests share the machine's cores)."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def top1(text: str, label: str) -> float:
    match = re.search(rf"{label} (\d+\.\d+) %", text)
    assert match, f"no '{label} N %' in:\n{text}"
    value = float(match.group(1))
    assert 0 <= value <= 100
    return value


def test_every_example_is_tested_linked_from_the_readme_and_uses_only_the_public_api():
    readme = (ROOT / "README.md").read_text()
    for path in sorted(EXAMPLES.glob("*.py")):
        assert path.name in TESTED, f"{path.name} has no test"
        assert f"examples/{path.name}" in readme, f"README.md does not link examples/{path.name}"
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no docstring saying what it shows and how to run it"
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
            [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        private = [m for m in imported if m.startswith("repopt.app") or any(p.startswith("_") for p in m.split("."))]
        assert not private, f"{path.name} imports {private}: examples use the public API only"
    assert set(TESTED) == {p.name for p in EXAMPLES.glob("*.py")}


def test_own_training_loop_searches_trains_folds_and_exports(tmp_path):
    out = run(EXAMPLES / "own_training_loop.py", "--toy", "--out", tmp_path / "run", cwd=tmp_path).stdout
    trained, deployed = top1(out, "RepOpt top-1"), top1(out, r"deployed \(BN folded\) top-1")
    assert abs(trained - deployed) <= 100 / 360  # the folded net is the same function: at most one tie flips
    scales = repopt.load_scales(tmp_path / "run" / "scales.safetensors")
    model = repopt.models.create("repopt_vgg_tiny", num_classes=10)
    assert set(scales) == set(repopt.models.target_convs(model))  # one entry per target conv of the trained net
    model.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"))  # the trained weights, every key
    onnx_file = tmp_path / "run" / "model.onnx"
    assert onnx_file.is_file() and onnx_file.stat().st_size > 10_000, out


def test_ddp_two_ranks_under_torchrun_end_with_identical_weights(tmp_path, busy_ports):
    """torchrun, 2 CPU ranks (gloo); --standalone picks a free port (torch's default one is held busy here)."""
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EXAMPLES / "ddp_torchrun.py",
              "--toy", cwd=tmp_path).stdout
    digests = dict(re.findall(r"rank (\d)/2: parameters sha256 ([0-9a-f]{16})", out))
    assert sorted(digests) == ["0", "1"], out
    assert digests["0"] == digests["1"], out  # without DDP each rank would have stepped on its own half-batch
    top1(out, "top-1")


def trained_checkpoint(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    """Weights that look trained (BatchNorm statistics moved, counted batches), with a head for another task."""
    g = torch.Generator().manual_seed(1)
    model = repopt.models.create(arch, mode="target", num_classes=num_classes)
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith("running_var"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        elif name.endswith("running_mean") or name.endswith(".bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
        elif name.endswith("num_batches_tracked"):
            t.fill_(1000)
        elif t.is_floating_point():
            t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return state


def test_finetune_from_a_released_format_checkpoint_keeps_its_weights(tmp_path):
    """The files in the formats the paper's repository releases: the checkpoint as a `model` wrapper with DDP's
    `module.` prefix and a 5-class head, the scales as its `.pth` of scale vectors."""
    arch = "repopt_vgg_tiny"
    state = trained_checkpoint(arch, num_classes=5)
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 120}, tmp_path / "ckpt.pth")
    hs = repopt.to_hyper_search(repopt.models.create(arch, num_classes=5))
    torch.save(released_keys(repopt.extract_scales(hs)), tmp_path / "scales.pth")

    out = run(EXAMPLES / "finetune_released_scales.py", "--arch", arch, "--checkpoint", tmp_path / "ckpt.pth",
              "--scales", tmp_path / "scales.pth", "--toy", "--out", tmp_path / "ft", cwd=tmp_path).stdout
    top1(out, "top-1 before fine-tuning")
    top1(out, "top-1 after fine-tuning")
    assert "replaced" in out, out  # the 5-class head does not fit the digits' 10 classes: said in one line
    tuned = load_file(tmp_path / "ft" / "model.safetensors")
    assert tuned["linear.weight"].shape[0] == 10
    # the kernels started from the checkpoint and moved a little (3 steps): no rule of initialization replaced them
    for name in repopt.models.target_convs(repopt.models.create(arch, num_classes=10)):
        before, after = state[f"{name}.weight"], tuned[f"{name}.weight"]
        change = (after - before).norm() / before.norm()
        assert 0 < change < 0.05, (name, float(change))
