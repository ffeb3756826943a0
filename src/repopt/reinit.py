"""The rule of initialization applied to a model: each target conv starts at its CSLA block's starting point."""
from __future__ import annotations

import torch
from torch import nn

from .branches import BranchSet


class ReinitError(ValueError):
    """Refusal to re-initialize weights that look trained."""


def looks_trained(model: nn.Module) -> str | None:
    """The name of the first BatchNorm whose affine parameters have left their init (weight 1, bias 0), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            if not (torch.all(m.weight == 1) and torch.all(m.bias == 0)):
                return name
    return None


@torch.no_grad()
def apply_rule_of_initialization(model: nn.Module, bound: dict[str, tuple[nn.Conv2d, BranchSet]],
                                 identity_init: str | float = "searched", force: bool = False,
                                 generator: torch.Generator | None = None) -> None:
    """W'(0) = sum_b alpha_b E_b(W_b(0)) + D(a(0)) for every bound conv (MATH (1), 'Rule of initialization').

    Refuses (ReinitError) when a BatchNorm of the model is no longer at its initial value, since that means the
    model has been trained and re-initializing would throw the training away; force=True overrides.
    """
    trained = looks_trained(model)
    if trained is not None and not force:
        raise ReinitError(f"BatchNorm {trained!r} is not at its initial value, so the model looks trained; "
                          f"refusing to re-initialize it (pass reinit=False to keep the weights, or "
                          f"force_reinit=True to overwrite them)")
    for conv, bs in bound.values():
        kernel = bs.initial_kernel(identity_init=identity_init, generator=generator, dtype=conv.weight.dtype)
        conv.weight.copy_(kernel.to(conv.weight.device))
