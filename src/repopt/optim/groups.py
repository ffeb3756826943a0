"""The usual parameter groups: weight decay on conv/linear weights, none on BatchNorm parameters and biases."""
from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Two groups: params with ndim >= 2 get `weight_decay`; 1-D params (BN, biases, scales) and any whose qualified
    name contains one of `no_decay_names` get none. Each group keeps the parameters' names under 'param_names'."""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if p.ndim <= 1 or any(s in name for s in no_decay_names) else decay
        target[0].append(p)
        target[1].append(name)
    groups = []
    if decay[0]:
        groups.append({"params": decay[0], "param_names": decay[1], "weight_decay": weight_decay})
    if no_decay[0]:
        groups.append({"params": no_decay[0], "param_names": no_decay[1], "weight_decay": 0.0})
    return groups
