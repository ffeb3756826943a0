"""`repopt.to_target(model)`: the plain conv-BN form of a multi-branch network, keeping the branch set of each block.

A structurally re-parameterizable block (RepVGG, MobileOne, RepGhost, RepLKNet-style large kernels, ...) trains a sum
of branches, each with its **own** BatchNorm. Its plain form here is the block's principal conv (kxk, no bias) and
one BatchNorm after it; the block's branch set (say MobileOne's k kxk branches + 1x1 + identity) becomes the branch
set of that conv's imaginary CSLA block, declared on the new block (`target_conv_names()`, `hs_branches()`), so
`to_hyper_search` and the optimizers use the branches the architecture's authors chose.

What is equal to what (docs/timm.md, "The equivalence"):
- In eval mode the copy computes what the original computes: at frozen statistics a branch's BatchNorm is a per-channel
  scale gamma_b / sigma_b and a bias, so the block is a CSLA block with scales alpha_b = gamma_b / sigma_b (MATH (1)):
  the principal conv gets the equivalent kernel, its BatchNorm the summed bias.
- In training, RepOpt on the plain conv equals exactly (float64) the CSLA block of that branch set, constant scales,
  one BatchNorm after the sum, trained by the stock optimizer. It does not equal the original block with its
  per-branch BatchNorms: those normalise each branch by its batch statistics, which no linear reparameterization
  reproduces. The hyper-search model's trainable per-branch scales are what stands for the per-branch gammas.

Blocks with no such form (FastViT's RepMixer and RepCPE: residual or bias outside any BatchNorm), blocks already in
their deployed form, and re-parameterizable blocks of unknown types are refused by name (`strict=False` leaves them
as they are, with a warning). Converters are matched on the block's class (module and name), so timm is never
imported here.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .branches import IDENTITY, BranchError, BranchSet, ConvGeometry


class ConversionError(ValueError):
    """A block that has no plain conv-BN form (or that this version does not know)."""


class ConvertedBlock(nn.Module):
    """The plain form of a multi-branch block: the listed children run in order (the principal conv's own module,
    then whatever followed the branch sum: attention/SE, activation); the principal conv keeps its original name."""

    def __init__(self, children: dict[str, nn.Module], path: Sequence[str], conv: str, branches: Sequence[str],
                 source: str):
        super().__init__()
        for name, module in children.items():
            self.add_module(name, module)
        self.path, self.conv_name, self.branches, self.source = list(path), conv, list(branches), source

    def forward(self, x):
        for name in self.path:
            x = self.get_submodule(name)(x)
        return x

    def target_conv_names(self) -> list[str]:
        return [self.conv_name]

    def hs_branches(self, name: str) -> list[str]:
        return list(self.branches)

    def extra_repr(self) -> str:
        return f"from {self.source}, branches={self.branches}"


# ---- the maths of one conversion -----------------------------------------------------------------------------------
def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of `bn` at its running statistics: bn(y) = scale * y + shift, in float64."""
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(std)
    return gamma / std, beta - bn.running_mean.double() * gamma / std


def _check_bn(bn, where: str) -> _BatchNorm:
    if not isinstance(bn, _BatchNorm) or bn.running_mean is None:
        raise ConversionError(f"{where}: expected a BatchNorm with running statistics, found {type(bn).__name__}")
    return bn


def _fits(conv: nn.Conv2d, target: ConvGeometry, where: str) -> None:
    """A branch conv must be a centred sub-kernel of the principal conv: same stride, groups, dilation, padding
    reduced by the size difference (what `reparameterize()` of these blocks assumes too)."""
    g = ConvGeometry.of(conv)
    kh, kw = g.kernel_size
    expect = (target.padding[0] - target.dilation[0] * (target.kernel_size[0] - kh) // 2,
              target.padding[1] - target.dilation[1] * (target.kernel_size[1] - kw) // 2)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or (g.stride, g.groups, g.dilation) != \
            (target.stride, target.groups, target.dilation) or g.padding != expect or \
            (g.in_channels, g.out_channels) != (target.in_channels, target.out_channels):
        raise ConversionError(f"{where}: this branch conv is not a centred part of the principal conv "
                              f"({type(conv).__name__} {g}, principal {target})")


@torch.no_grad()
def _merge(principal: nn.Conv2d, principal_bn: _BatchNorm, others: list[tuple[str, nn.Conv2d | None, _BatchNorm]],
           where: str) -> list[str]:
    """Write the block's eval-mode function into (principal conv, principal BN); return the branch set.

    Branch b contributes alpha_b E_b(W_b) (alpha_b = gamma_b / sigma_b) and a bias; the identity contributes D(alpha).
    The principal BN is then left with running statistics at their start (so a fresh model still looks fresh) and the
    block's summed bias as its shift; how many batches the branches saw is kept, so a trained model still looks trained.
    """
    if type(principal) is not nn.Conv2d or principal.padding_mode != "zeros" or isinstance(principal.padding, str):
        raise ConversionError(f"{where}: the principal conv is a {type(principal).__name__}, not a zero-padded "
                              f"nn.Conv2d")
    geometry = ConvGeometry.of(principal)
    kh, kw = geometry.kernel_size
    branches = [(f"{kh}x{kw}", principal, _check_bn(principal_bn, where))]
    for name, conv, bn in others:
        if conv is not None:
            _fits(conv, geometry, f"{where} ({name} branch)")
        branches.append((name, conv, _check_bn(bn, f"{where} ({name} branch)")))
    names = [b for b, _, _ in branches if b != IDENTITY] + [IDENTITY] * any(b == IDENTITY for b, _, _ in branches)
    if principal.weight.is_meta:  # a model built for its shapes only (e.g. to check a scales file): no values
        return names
    scales, kernels, identity = {}, {}, None
    bias = torch.zeros(geometry.out_channels, dtype=torch.float64, device=principal.weight.device)
    for name, conv, bn in branches:
        scale, shift = _bn_affine(bn)
        bias += shift
        if conv is None:
            identity = scale
            continue
        if conv.bias is not None:
            bias += scale * conv.bias.double()
        scales[name], kernels[name] = scale, conv.weight.double()
    try:
        spec = {**{n: s.cpu() for n, s in scales.items()}, **({IDENTITY: identity.cpu()} if identity is not None
                                                             else {})}
        bs = BranchSet(geometry, spec, name=where)
    except BranchError as e:
        raise ConversionError(f"{where}: {e.reason}") from None
    kernel = bs.equivalent_kernel(kernels, identity, scales)
    seen = max(int(bn.num_batches_tracked or 0) for _, _, bn in branches)
    start = (1.0 + principal_bn.eps) ** 0.5  # the BN divides by sqrt(1 + eps) at its starting statistics
    principal.weight.copy_((kernel * start).to(principal.weight.dtype))
    principal.bias = None  # counted in `bias` above: the BN's shift carries it now
    principal_bn.reset_running_stats()
    if principal_bn.num_batches_tracked is not None:
        principal_bn.num_batches_tracked.fill_(seen)
    if principal_bn.affine:
        principal_bn.weight.fill_(1.0)
        principal_bn.bias.copy_(bias.to(principal_bn.bias.dtype))
    elif torch.any(bias != 0):
        raise ConversionError(f"{where}: the block has a bias but its principal BatchNorm has no affine shift to "
                              f"carry it")
    return names


# ---- converters: one per block type --------------------------------------------------------------------------------
def _deployed(block: nn.Module, where: str) -> None:
    if getattr(block, "reparam_conv", None) is not None:
        raise ConversionError(f"{where} ({type(block).__name__}) is already re-parameterized (a conv with bias); "
                              f"to_target needs the training-time form")


def _no_drop_path(block: nn.Module, where: str) -> None:
    drop = getattr(block, "drop_path", None)
    if drop is not None and not isinstance(drop, nn.Identity):
        raise ConversionError(f"{where} ({type(block).__name__}) uses drop_path between its branches, which a single "
                              f"conv cannot express; create the model with drop_path_rate=0")


def _timm_repvgg(block, where):
    _deployed(block, where)
    _no_drop_path(block, where)
    others = [("1x1", block.conv_1x1.conv, block.conv_1x1.bn)]
    if block.identity is not None:
        others.append((IDENTITY, None, block.identity))
    branches = _merge(block.conv_kxk.conv, block.conv_kxk.bn, others, where)
    return ConvertedBlock({"conv_kxk": block.conv_kxk, "attn": block.attn, "act": block.act},
                          ["conv_kxk", "attn", "act"], "conv_kxk.conv", branches, "timm RepVggBlock")


def _mobileone(block, where, post: str, source: str):
    _deployed(block, where)
    _no_drop_path(block, where)
    convs = list(block.conv_kxk or [])
    if not convs:
        raise ConversionError(f"{where} ({source}) has no conv branch (an identity-only block has no conv to train)")
    kh, kw = convs[0].conv.kernel_size
    others = [(f"{kh}x{kw}_{i + 1}", c.conv, c.bn) for i, c in enumerate(convs) if i > 0]
    if block.conv_scale is not None:
        others.append(("1x1", block.conv_scale.conv, block.conv_scale.bn))
    if block.identity is not None:
        others.append((IDENTITY, None, block.identity))
    branches = _merge(convs[0].conv, convs[0].bn, others, where)
    return ConvertedBlock({"conv_kxk": nn.ModuleList(convs[:1]), post: getattr(block, post), "act": block.act},
                          ["conv_kxk.0", post, "act"], "conv_kxk.0.conv", branches, source)


def _large_kernel(block, where):
    _deployed(block, where)
    small = getattr(block, "small_conv", None)
    k = block.small_kernel
    others = [] if small is None else [(f"{k}x{k}", small.conv, small.bn)]
    branches = _merge(block.large_conv.conv, block.large_conv.bn, others, where)
    return ConvertedBlock({"large_conv": block.large_conv, "se": block.se, "act": block.act},
                          ["large_conv", "se", "act"], "large_conv.conv", branches, "timm ReparamLargeKernelConv")


def _repghost(block, where):
    cheap = block.cheap_operation
    if not isinstance(cheap, nn.Sequential) or len(cheap) != 2:
        raise ConversionError(f"{where} (RepGhostModule) is already re-parameterized; to_target needs the "
                              f"training-time form")
    others = []
    for conv, bn in zip(block.fusion_conv, block.fusion_bn):
        if not isinstance(conv, nn.Identity):
            raise ConversionError(f"{where} (RepGhostModule): a fusion branch with a {type(conv).__name__} is not "
                                  f"the identity-BN path this converter knows")
        others.append((IDENTITY, None, bn))
    branches = _merge(cheap[0], cheap[1], others, where)
    return ConvertedBlock({"primary_conv": block.primary_conv, "cheap_operation": cheap, "relu": block.relu},
                          ["primary_conv", "cheap_operation", "relu"], "cheap_operation.0", branches,
                          "timm RepGhostModule")


def _repopt_repvgg(block, where):
    from .models.blocks import TargetBlock

    if block.reparameterized:
        raise ConversionError(f"{where} (RepVGGBlock) is already re-parameterized; to_target needs the training-time "
                              f"form")
    others = [("1x1", block.conv_1x1, block.bn_1x1)]
    if block.bn_identity is not None:
        others.append((IDENTITY, None, block.bn_identity))
    _merge(block.conv_3x3, block.bn_3x3, others, where)
    target = TargetBlock(block.in_channels, block.out_channels, block.stride)
    target.conv, target.bn, target.relu = block.conv_3x3, block.bn_3x3, block.relu
    return target  # RepOpt-VGG declares its convs itself (same names as its target mode)


CONVERTERS: dict[str, Callable[[nn.Module, str], nn.Module]] = {
    "timm.models.byobnet.RepVggBlock": _timm_repvgg,
    "timm.models.byobnet.MobileOneBlock": lambda b, w: _mobileone(b, w, "attn", "timm MobileOneBlock"),
    "timm.models.fastvit.MobileOneBlock": lambda b, w: _mobileone(b, w, "se", "timm FastViT MobileOneBlock"),
    "timm.models.fastvit.ReparamLargeKernelConv": _large_kernel,
    "timm.models.repghost.RepGhostModule": _repghost,
    "repopt.models.repvgg_block.RepVGGBlock": _repopt_repvgg,
}

REFUSED = {
    "timm.models.fastvit.RepMixer": "its residual x + layer_scale * (mixer(x) - norm(x)) lies outside any BatchNorm, "
                                    "so its plain form is a depthwise conv with a bias that no BatchNorm follows",
    "timm.models.fastvit.RepConditionalPosEnc": "it is a biased depthwise conv plus the identity with no BatchNorm",
}


def _key(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_reparameterizable(module: nn.Module) -> bool:
    return any(callable(getattr(module, m, None)) for m in ("reparameterize", "switch_to_deploy", "fuse"))


def _convert(module: nn.Module, prefix: str, strict: bool, skipped: list[str], converted: list[str]) -> None:
    for name, child in list(module.named_children()):
        where = f"{prefix}.{name}" if prefix else name
        key = _key(child)
        converter = CONVERTERS.get(key)
        if converter is not None:
            setattr(module, name, converter(child, where))
            converted.append(where)
            continue
        reason = REFUSED.get(key)
        if reason is None and _is_reparameterizable(child) and not isinstance(child, ConvertedBlock):
            reason = "repopt knows no plain conv-BN form for this re-parameterizable block"
        if reason is not None:
            if strict:
                raise ConversionError(f"to_target: {where} is a {key}: {reason} (pass strict=False to keep such "
                                      f"blocks as they are)")
            skipped.append(f"{where} ({type(child).__name__})")
            continue
        _convert(child, where, strict, skipped, converted)


def to_target(model: nn.Module, strict: bool = True) -> nn.Module:
    """A plain conv-BN copy of `model`: every known multi-branch block becomes its principal conv + one BatchNorm,
    declaring the block's branch set for `to_hyper_search` and the optimizers; conv biases in front of a BatchNorm
    are folded into it. The copy computes what `model` computes in eval mode (the equivalent kernel, MATH (1)).

    Known blocks: repopt's RepVGGBlock; timm's RepVggBlock and MobileOneBlock (byobnet), RepGhostModule, FastViT's
    MobileOneBlock and ReparamLargeKernelConv. Refused by name (ConversionError): FastViT's RepMixer and
    RepConditionalPosEnc, blocks already re-parameterized, and any other module with a reparameterize() /
    switch_to_deploy() / fuse() method; strict=False keeps those as they are (with a warning) instead.
    A model with none of these is copied with its biases folded (its target convs are then found by module order).
    """
    from .search import fold_target_biases

    if isinstance(model, ConvertedBlock) or CONVERTERS.get(_key(model)) is not None:
        raise ConversionError("to_target: pass the whole network, not one block")
    target = copy.deepcopy(model)
    skipped, converted = [], []
    _convert(target, "", strict, skipped, converted)
    if getattr(target, "mode", None) == "repvgg" and converted:
        target.mode = "target"  # repopt's RepOpt-VGG built in RepVGG mode is now its target mode
    if skipped:
        warnings.warn(f"to_target: {len(skipped)} blocks have no plain conv-BN form and stay multi-branch, trained "
                      f"without branch scales: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}",
                      stacklevel=2)
    fold_target_biases(target, who="to_target")
    return target
