"""Which convs of a model are *targets* of gradient re-parameterization: the one definition every part of repopt uses
(hyper-search conversion, `Scales.bind(strict=True)`, the rule of initialization and its "looks trained" guard, the
CLI's checks).

`target_convs(model)`: the convs the model declares (`model.target_conv_names()`, as repopt's models do), or else the
ones its blocks declare (a submodule's `target_conv_names()`, relative to it: the blocks `repopt.to_target` makes out
of multi-branch blocks), or else `find_target_convs(model)`: every plain Conv2d with a kernel larger than 1x1 whose
output goes straight into a BatchNorm of the same width. "Straight into" is judged by module registration order, the
order conv-BN nets are written in: the BN is the next module registered after the conv, skipping containers that hold
no computation of their own. BatchNorm subclasses with children (timm's `BatchNormAct2d`, which carries its
activation and dropout inside) count as the BatchNorm they are. A conv bias in front of a BatchNorm does not stop a
conv from being a target: the BN's mean subtraction removes it (`to_hyper_search` and `to_target` fold it away). A
user can always pass names explicitly.
"""
from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _is_leaf(module: nn.Module) -> bool:
    return not any(True for _ in module.children())


def conv_norm_pairs(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(conv name, conv, next layer name, next layer) for every leaf Conv2d of `model`, in registration order.

    The next layer is the first module registered after the conv that is a BatchNorm (a subclass with children
    included) or a leaf; None when the conv is the last layer. One pass over the modules.
    """
    pending = None
    for name, module in model.named_modules():
        leaf = _is_leaf(module)
        if pending is not None and (leaf or isinstance(module, _BatchNorm)):
            yield *pending, name, module
            pending = None
        if leaf and isinstance(module, nn.Conv2d):
            pending = (name, module)
    if pending is not None:
        yield *pending, None, None


def conv_norms(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """conv name -> (name, module) of the BatchNorm it feeds (module order), for every conv that feeds one."""
    return {conv: (name, norm) for conv, _, name, norm in conv_norm_pairs(model) if isinstance(norm, _BatchNorm)}


def find_target_convs(model: nn.Module) -> list[str]:
    """Every kxk (k > 1) plain Conv2d that feeds a BatchNorm of its width (module order); a bias is allowed."""
    return [name for name, conv, _, norm in conv_norm_pairs(model)
            if type(conv) is nn.Conv2d and max(conv.kernel_size) > 1
            and isinstance(norm, nn.BatchNorm2d) and norm.num_features == conv.out_channels]


def _declarer(module: nn.Module):
    declared = getattr(module, "target_conv_names", None)
    return declared if callable(declared) else None


def declaring_blocks(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of the outermost modules that declare their own target convs, the root included."""
    if _declarer(model) is not None:
        yield prefix, model
        return
    for name, child in model.named_children():
        yield from declaring_blocks(child, f"{prefix}.{name}" if prefix else name)


def declared_branches(model: nn.Module, conv_name: str) -> list[str] | None:
    """The branch set (conv branches, 'identity' where present) that the block declaring `conv_name` gives it through
    `hs_branches(relative_name)`, or None when no block says."""
    for prefix, block in declaring_blocks(model):
        relative = conv_name[len(prefix) + 1:] if prefix else conv_name
        if prefix and not conv_name.startswith(prefix + "."):
            continue
        hook = getattr(block, "hs_branches", None)
        if callable(hook) and relative in _declarer(block)():
            return list(hook(relative))
    return None


def target_convs(model: nn.Module) -> list[str]:
    """The convs of `model` that RepOpt trains with branch scales: the ones the model or its blocks declare
    (`target_conv_names()`), else `find_target_convs(model)`."""
    names = [f"{prefix}.{n}" if prefix else n for prefix, block in declaring_blocks(model)
             for n in _declarer(block)()]
    return names if names or any(True for _ in declaring_blocks(model)) else find_target_convs(model)
