"""Which convs of a model are *targets* of gradient re-parameterization: the one definition every part of repopt uses
(hyper-search conversion, `Scales.bind(strict=True)`, the rule of initialization, the CLI's checks).

`target_convs(model)`: the model's own list when it declares one (`model.target_conv_names()`, as repopt's models
do), else `find_target_convs(model)`: every plain Conv2d with a kernel larger than 1x1 and no bias whose output goes
straight into a BatchNorm of the same width. "Straight into" is judged by module registration order, the order
conv-BN nets are written in: the BN is the next module registered after the conv, skipping containers that hold no
computation of their own. BatchNorm subclasses with children (timm's `BatchNormAct2d`, which carries its activation
and dropout inside) count as the BatchNorm they are. A user can always pass names explicitly.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _is_leaf(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if _is_leaf(module):
            yield name, module


def conv_norm_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(conv name, conv, next layer name, next layer) for every leaf Conv2d of `model`, in registration order.

    The next layer is the first module registered after the conv that is a BatchNorm (a subclass with children
    included) or a leaf; None when the conv is the last layer.
    """
    modules = list(model.named_modules())
    for i, (name, module) in enumerate(modules):
        if not isinstance(module, nn.Conv2d) or not _is_leaf(module):
            continue
        nxt = next(((n, m) for n, m in modules[i + 1:] if isinstance(m, _BatchNorm) or _is_leaf(m)), (None, None))
        yield name, module, nxt[0], nxt[1]


def find_target_convs(model: nn.Module) -> list[str]:
    """Every kxk (k > 1) plain Conv2d without bias that feeds a BatchNorm of its width (module order)."""
    return [name for name, conv, _, norm in conv_norm_pairs(model)
            if type(conv) is nn.Conv2d and conv.bias is None and max(conv.kernel_size) > 1
            and isinstance(norm, nn.BatchNorm2d) and norm.num_features == conv.out_channels]


def target_convs(model: nn.Module) -> list[str]:
    """The convs of `model` that RepOpt trains with branch scales: `model.target_conv_names()` when the model
    declares them (repopt's models), else `find_target_convs(model)`."""
    declared = getattr(model, "target_conv_names", None)
    if callable(declared):
        return list(declared())
    return find_target_convs(model)
