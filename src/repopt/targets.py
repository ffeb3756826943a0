"""Which convs of a model are *targets* of gradient re-parameterization.

By default: every Conv2d with a kernel larger than 1x1 and no bias whose output goes straight into a BatchNorm2d of
the same width (judged by module order: the BN is the next leaf module registered after the conv). This is the
conv-BN pattern of VGG/RepVGG/ResNet-style nets; a user can always pass names explicitly.
"""
from __future__ import annotations

from torch import nn


def _leaves(model: nn.Module):
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            yield name, module


def find_target_convs(model: nn.Module) -> list[str]:
    leaves = list(_leaves(model))
    found = []
    for (name, module), (_, nxt) in zip(leaves, leaves[1:]):
        if (type(module) is nn.Conv2d and module.bias is None and max(module.kernel_size) > 1
                and isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == module.out_channels):
            found.append(name)
    return found
