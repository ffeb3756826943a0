"""The three ways of training one architecture that the benchmarks compare, built identically:

    plain   the target model (conv-BN-ReLU) trained by torch SGD          (what RepOpt must not be slower than)
    repopt  the same target model trained by RepOptSGD                    (RepOpt-VGG)
    repvgg  the multi-branch RepVGG training model trained by torch SGD   (structural re-parameterization)

All three use the same optimizer flags (SGD, momentum 0.9, nesterov, weight decay; `fused=True`, torch's fastest
path on CPU and CUDA), the same batch and the same random data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("plain", "repopt", "repvgg")
SGD_FLAGS = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5, fused=True)


def create(arch, mode: str, num_classes: int, **model_options) -> nn.Module:
    """A registered model by name, or a RepOpt-VGG from a VGGConfig (the scaling sweeps build their own)."""
    from ...models import RepOptVGG, VGGConfig
    from ...models import create as create_registered

    if isinstance(arch, VGGConfig):
        return RepOptVGG(arch, mode=mode, num_classes=num_classes, **model_options)
    return create_registered(arch, mode=mode, num_classes=num_classes, **model_options)


def arch_name(arch) -> str:
    if isinstance(arch, str):
        return arch
    return f"vgg(stem={arch.stem}, widths={list(arch.widths)}, blocks={list(arch.blocks)})"


def bench_scales(arch, num_classes: int, **model_options):
    """Scales for every target conv of `arch` ({3x3, 1x1, identity where possible}, the HS starting values).

    Their values do not change the cost of a step, only their structure does, so no search is run.
    """
    from ...search import extract_scales

    return extract_scales(create(arch, "hs", num_classes, **model_options))


def build(method: str, arch, num_classes: int, scales=None, device="cpu", seed: int = 0,
          sgd_flags: dict | None = None, **model_options) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(model in train mode on `device`, optimizer) for one of METHODS."""
    from ...optim import RepOptSGD, param_groups

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    flags = dict(SGD_FLAGS if sgd_flags is None else sgd_flags)
    torch.manual_seed(seed)
    model = create(arch, "repvgg" if method == "repvgg" else "target", num_classes, **model_options)
    if method == "repopt":
        scales = bench_scales(arch, num_classes, **model_options) if scales is None else scales
        wd = flags.pop("weight_decay")
        opt = RepOptSGD.from_scales(model, scales, weight_decay=wd, **flags)
    else:
        opt = torch.optim.SGD(param_groups(model, flags.pop("weight_decay")), **flags)
    model.to(device).train()
    return model, opt


def batch(size: int, image_size: int, num_classes: int, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (size,), generator=g)
    return x.to(device), y.to(device)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step, as repopt.app.train does it: zero_grad(set_to_none) -> forward -> loss -> backward -> step."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
