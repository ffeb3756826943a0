"""Hyper-search for any conv net: turn its target convs into HS convs with trainable branch scales, and read the
trained scales back as a repopt.Scales keyed by the original conv names (MATH.md, "Hyper-search").

    hs = repopt.to_hyper_search(model)        # a copy; `model` is untouched
    ... train hs (optimizer groups: repopt.search.hs_param_groups) ...
    scales = repopt.extract_scales(hs)        # -> RepOptSGD.from_scales(model, scales, ...)
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .branches import IDENTITY, BranchError, ConvGeometry, branch_kernel_size
from .models.csla_conv import CSLAConv2d, hs_convs, set_scales  # noqa: F401 (set_scales: re-exported)
from .scales import Scales, ScalesError

Branches = Sequence[str] | Callable[[str, nn.Conv2d], Sequence[str]]


def _branches_for(name: str, conv: nn.Conv2d, branches: Branches) -> list[str]:
    chosen = list(branches(name, conv) if callable(branches) else branches)
    kh, kw = conv.kernel_size
    if not any(branch_kernel_size(b) == (kh, kw) for b in chosen):
        chosen.insert(0, f"{kh}x{kw}")  # without a full-size branch the outer taps of W' could never train
    return chosen


def _identity_for(name: str, geometry: ConvGeometry, identity) -> bool:
    reason = geometry.identity_reason()
    if identity == "auto":
        return reason is None
    if identity and reason is not None:
        raise BranchError(f"{name}: an identity branch is impossible here ({reason})")
    return bool(identity)


def _scale_init_for(model: nn.Module, name: str, conv: nn.Conv2d, scale_init) -> float:
    if scale_init == "auto":
        hook = getattr(model, "hs_scale_init", None)  # our models know their depth structure; others start at 1
        return float(hook(name)) if callable(hook) else 1.0
    return float(scale_init(name, conv) if callable(scale_init) else scale_init)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def to_hyper_search(model: nn.Module, select: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                    branches: Branches = ("3x3", "1x1"), identity: bool | str = "auto",
                    scale_init: float | str | Callable[[str, nn.Conv2d], float] = "auto") -> nn.Module:
    """A deep copy of `model` whose selected convs are CSLAConv2d HS convs with trainable branch scales.

    select: conv names, or a predicate (name, module) -> bool; default repopt.targets.target_convs(model) (the
        model's own list, else every kxk conv without bias that feeds a BatchNorm).
    branches: conv branches of every HS conv, or a function (name, conv) -> branches. A branch of the conv's own kernel
        size is added when missing. The full-size branch starts from the conv's current kernel, the others from
        PyTorch's default init.
    identity: 'auto' (where shapes allow), True (required: error where impossible) or False.
    scale_init: initial conv-branch scales: 'auto' uses the model's `hs_scale_init(name)` when it has one (RepOpt-VGG:
        1 for the stem and the first block of a stage, sqrt(2/l) for block l), else 1.0; or a number, or a function
        (name, conv) -> number. Identity scales start at 1.
    """
    from .targets import target_convs

    hs = copy.deepcopy(model)
    modules = dict(hs.named_modules())
    if select is None:
        names = target_convs(hs)
    elif callable(select):
        names = [n for n, m in modules.items() if n and select(n, m)]
    else:
        names = list(select)
    if not names:
        raise ValueError("to_hyper_search: no conv selected (the model has no kxk conv without bias feeding a "
                         "BatchNorm); pass select= with the conv names")
    for name in names:
        conv = modules.get(name)
        if type(conv) is not nn.Conv2d:
            what = "does not exist" if conv is None else f"is a {type(conv).__name__}, not an nn.Conv2d"
            raise ValueError(f"to_hyper_search: layer {name!r} {what}")
        if conv.bias is not None or conv.padding_mode != "zeros":
            raise ValueError(f"to_hyper_search: layer {name!r} has a bias or non-zero padding; an HS conv is a "
                             f"bias-free zero-padded conv followed by a BatchNorm")
        geometry = ConvGeometry.of(conv)
        chosen = _branches_for(name, conv, branches)
        init = _scale_init_for(model, name, conv, scale_init)
        try:
            new = CSLAConv2d(geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride,
                             geometry.padding, geometry.dilation, geometry.groups, branches={b: init for b in chosen},
                             identity=_identity_for(name, geometry, identity), trainable_scales=True)
        except BranchError as e:
            raise BranchError(f"layer {name!r}: {e}") from None
        new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        full = next(b for b in chosen if branch_kernel_size(b) == tuple(conv.kernel_size))
        with torch.no_grad():
            new.convs[full].copy_(conv.weight)
        new.train(conv.training)
        _set_submodule(hs, name, new)
    return hs


def extract_scales(hs_model: nn.Module) -> Scales:
    """The branch scales of every CSLAConv2d of `hs_model`, keyed by its qualified name (= the target conv's name)."""
    convs = hs_convs(hs_model)
    if not convs:
        raise ScalesError("the model has no hyper-search conv (CSLAConv2d); build one with repopt.to_hyper_search("
                          "model) or repopt.models.create(name, mode='hs')")
    meta = {"source": "hyper-search"}
    if isinstance(getattr(hs_model, "arch", None), str):
        meta["arch"] = hs_model.arch
    return Scales({n: m.scales() for n, m in convs.items()}, meta)


def hs_param_groups(hs_model: nn.Module, weight_decay: float) -> list[dict]:
    """The HS recipe's groups: weight decay on conv kernels (branch kernels included), identity scales and other
    >= 2-D weights; none on conv-branch scales, BatchNorm parameters and biases. Keeps names under 'param_names'."""
    decayed_1d, undecayed = set(), set()
    for conv in hs_convs(hs_model).values():
        if conv.identity is not None:
            decayed_1d.add(id(conv.identity))
        undecayed.update(id(p) for n, p in conv.named_parameters(recurse=False) if n.startswith("scale_"))
    decay, no_decay = {"params": [], "param_names": []}, {"params": [], "param_names": []}
    for name, p in hs_model.named_parameters():
        if not p.requires_grad:
            continue
        wanted = id(p) in decayed_1d or (p.ndim >= 2 and id(p) not in undecayed)
        group = decay if wanted else no_decay
        group["params"].append(p)
        group["param_names"].append(name)
    decay["weight_decay"], no_decay["weight_decay"] = weight_decay, 0.0
    return [g for g in (decay, no_decay) if g["params"]]
