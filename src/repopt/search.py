"""Hyper-search for any conv net: turn its target convs into HS convs with trainable branch scales, and read the
trained scales back as a repopt.Scales keyed by the original conv names (MATH.md, "Hyper-search").

    hs = repopt.to_hyper_search(model)        # a copy; `model` is untouched
    ... train hs (optimizer groups: repopt.search.hs_param_groups) ...
    scales = repopt.extract_scales(hs)        # -> RepOptSGD.from_scales(model, scales, ...)
"""
from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .branches import IDENTITY, BranchError, ConvGeometry, branch_kernel_size
from .models.csla_conv import CSLAConv2d, hs_convs, set_scales  # noqa: F401 (set_scales: re-exported)
from .scales import Scales, ScalesError

Branches = Sequence[str] | Callable[[str, nn.Conv2d], Sequence[str]]


DEFAULT_BRANCHES = ("3x3", "1x1")


def _branches_for(name: str, conv: nn.Conv2d, branches: Branches, declared: list[str] | None) -> list[str]:
    if branches is None:
        chosen = [b for b in declared if b != IDENTITY] if declared is not None else list(DEFAULT_BRANCHES)
    else:
        chosen = list(branches(name, conv) if callable(branches) else branches)
    kh, kw = conv.kernel_size
    if not any(branch_kernel_size(b) == (kh, kw) for b in chosen):
        chosen.insert(0, f"{kh}x{kw}")  # without a full-size branch the outer taps of W' could never train
    return chosen


def _identity_for(name: str, geometry: ConvGeometry, identity, declared: list[str] | None) -> bool:
    reason = geometry.identity_reason()
    if identity == "auto":
        return IDENTITY in declared if declared is not None else reason is None
    if identity and reason is not None:
        raise BranchError(f"{name}: an identity branch is impossible here ({reason})")
    return bool(identity)


def depth_scale_init(convs: Sequence[tuple[str, bool]]) -> dict[str, float]:
    """The paper's initial HS scales for any model, from (conv name, has identity branch) in model order.

    A conv without an identity (the stem, the first stride-2 or widening conv of a stage) starts at 1 and restarts
    the count; the l-th conv with an identity after it starts at sqrt(2 / l): the identity paths add up along a
    stage, so the conv branches start smaller as it gets deeper. On RepOpt-VGG this is its own rule (models/vgg.py).
    """
    out, depth = {}, 0
    for name, has_identity in convs:
        depth = depth + 1 if has_identity else 0
        out[name] = math.sqrt(2.0 / depth) if depth else 1.0
    return out


def _scale_init_for(model: nn.Module, name: str, conv: nn.Conv2d, scale_init, by_depth: dict[str, float]) -> float:
    if scale_init == "auto":
        hook = getattr(model, "hs_scale_init", None)  # our models know their block structure
        return float(hook(name)) if callable(hook) else by_depth[name]
    return float(scale_init(name, conv) if callable(scale_init) else scale_init)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def fold_target_biases(model: nn.Module, names: Iterable[str] | None = None, who: str = "repopt") -> list[str]:
    """Fold the bias of every conv among `names` (default: the target convs) that feeds a BatchNorm into that BN's
    running mean, in place: BN(conv(x) + b) with mean m equals BN(conv(x)) with mean m - b, in training (the batch
    mean moves by b) and in evaluation alike. Warns once, naming the convs; returns their names."""
    from .targets import conv_norms, target_convs

    folded, norms = [], conv_norms(model)
    for name in (target_convs(model) if names is None else names):
        conv = model.get_submodule(name)
        norm = norms.get(name) if isinstance(conv, nn.Conv2d) and conv.bias is not None else None
        if norm is None:
            continue
        bn = norm[1]
        if bn.running_mean is not None:
            bn.running_mean.sub_(conv.bias.detach().to(bn.running_mean.dtype))
        conv.bias = None
        folded.append(name)
    if folded:
        warnings.warn(f"{who}: the bias of {len(folded)} conv(s) feeding a BatchNorm was folded into it (redundant "
                      f"there: the BN subtracts the mean): {', '.join(folded[:4])}{' ...' if len(folded) > 4 else ''}",
                      stacklevel=3)
    return folded


def to_hyper_search(model: nn.Module, select: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                    branches: Branches | None = None, identity: bool | str = "auto",
                    scale_init: float | str | Callable[[str, nn.Conv2d], float] = "auto") -> nn.Module:
    """A deep copy of `model` whose selected convs are CSLAConv2d HS convs with trainable branch scales.

    select: conv names, or a predicate (name, module) -> bool; default repopt.targets.target_convs(model) (the
        convs the model or its blocks declare, else every kxk conv that feeds a BatchNorm).
    branches: conv branches of every HS conv, or a function (name, conv) -> branches; default: the branch set the
        conv's block declares (the blocks of `repopt.to_target`), else ('3x3', '1x1'). A branch of the conv's own
        kernel size is added when missing. The full-size branch starts from the conv's current kernel, the others
        from PyTorch's default init.
    identity: 'auto' (the declared branch set, else where shapes allow), True (required: error where impossible) or
        False.
    scale_init: initial conv-branch scales: 'auto' uses the model's `hs_scale_init(name)` when it has one, else the
        paper's rule by depth (`depth_scale_init`: 1 for a conv without identity, sqrt(2/l) for the l-th with one
        after it); or a number, or a function (name, conv) -> number. Identity scales start at 1.
    A conv bias in front of a BatchNorm is folded into the BN (with one warning); a bias with no BN is refused.
    """
    from .targets import conv_norms, declared_branches, target_convs

    hs = copy.deepcopy(model)
    modules = dict(hs.named_modules())
    if select is None:
        names = target_convs(hs)
    elif callable(select):
        names = [n for n, m in modules.items() if n and select(n, m)]
    else:
        names = list(select)
    if not names:
        raise ValueError("to_hyper_search: no conv selected (the model has no kxk conv feeding a BatchNorm); pass "
                         "select= with the conv names")
    plan, norms = [], conv_norms(hs)
    for name in names:
        conv = modules.get(name)
        if type(conv) is not nn.Conv2d:
            what = "does not exist" if conv is None else f"is a {type(conv).__name__}, not an nn.Conv2d"
            raise ValueError(f"to_hyper_search: layer {name!r} {what}")
        if conv.padding_mode != "zeros" or (conv.bias is not None and name not in norms):
            raise ValueError(f"to_hyper_search: layer {name!r} has a bias with no BatchNorm after it, or non-zero "
                             f"padding; an HS conv is a bias-free zero-padded conv followed by a BatchNorm")
        geometry = ConvGeometry.of(conv)
        declared = declared_branches(hs, name)
        plan.append((name, conv, geometry, _branches_for(name, conv, branches, declared),
                     _identity_for(name, geometry, identity, declared)))
    fold_target_biases(hs, [name for name, *_ in plan], who="to_hyper_search")
    by_depth = depth_scale_init([(name, has_identity) for name, *_, has_identity in plan])
    for name, conv, geometry, chosen, has_identity in plan:
        init = _scale_init_for(model, name, conv, scale_init, by_depth)
        try:
            new = CSLAConv2d(geometry.in_channels, geometry.out_channels, geometry.kernel_size, geometry.stride,
                             geometry.padding, geometry.dilation, geometry.groups, branches={b: init for b in chosen},
                             identity=has_identity, trainable_scales=True)
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
