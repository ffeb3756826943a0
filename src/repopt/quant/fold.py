"""BatchNorm folding: conv -> BN pairs become one conv with a bias (the deployed, plain form of a target model).

Pairs are found by module registration order, as in `repopt.targets`: a BN that is the next module after a conv
is taken to consume that conv's output. This holds for Sequential stacks and for blocks that register
`conv`, `bn`, `relu` in the order they run; a model that registers modules in another order than it calls them
should be folded by its own code.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..targets import conv_norm_pairs

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)  # works for Sequential ("0") and attribute-style children alike


# BatchNorm subclasses that normalise and then run their children: timm's BatchNormAct2d (batch_norm, then `drop`,
# then `act`). Folded, they leave those children behind, in that order.
_BN_THEN_CHILDREN = {"timm.layers.norm_act.BatchNormAct2d": ("drop", "act")}


def _key(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _remainder(bn: nn.Module) -> nn.Module | None:
    """What is left of `bn` once its normalisation is folded into the conv before it; None: not foldable.

    Exact types only: a Conv2d subclass (e.g. a multi-branch conv) may compute something other than its `weight`, and
    an unknown BatchNorm subclass may do more than normalise."""
    if type(bn) in _BN_TYPES:
        return nn.Identity()
    children = _BN_THEN_CHILDREN.get(_key(bn))
    if children is not None and [n for n, _ in bn.named_children()] == list(children):
        return nn.Sequential(*(getattr(bn, n) for n in children))
    return None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and _remainder(bn) is not None and bn.num_features == conv.out_channels
            and bn.track_running_stats and bn.running_mean is not None)


@torch.no_grad()
def fused_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One Conv2d (with bias) equal to `bn(conv(x))` with BN in eval mode (running statistics)."""
    dtype = conv.weight.dtype
    # float64 so that folding adds no error of its own beyond the final cast.
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(std)
    factor = gamma / std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(std)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=conv.weight.device, dtype=dtype)
    fused.weight.copy_((conv.weight.double() * factor.view(-1, 1, 1, 1)).to(dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * factor + beta).to(dtype))
    fused.train(conv.training)
    return fused


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) for every Conv2d directly followed, in module order, by a foldable BatchNorm2d."""
    return [(cname, bname) for cname, conv, bname, bn in conv_norm_pairs(model) if _foldable(conv, bn)]


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every conv -> BN pair of `model` into a single biased conv; the BN becomes nn.Identity (timm's
    BatchNormAct2d: its dropout and activation).

    The result equals `model` in eval mode. With `inplace=False` (default) `model` is left untouched.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for conv_name, bn_name in conv_bn_pairs(model):
        fused = fused_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        bn = model.get_submodule(bn_name)
        _set_submodule(model, conv_name, fused)
        _set_submodule(model, bn_name, _remainder(bn))
    return model
