"""The rule of initialization applied to a model: each target conv starts at its CSLA block's starting point."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .branches import BranchSet


class ReinitError(ValueError):
    """Refusal to re-initialize weights that look trained."""


def _bn_trained(bn: _BatchNorm) -> bool:
    """Has this BatchNorm seen training data? Judged by its running statistics, which every architecture leaves at
    their start (mean 0, variance 1, no batches counted) whatever it does to gamma and beta (timm's zero_init_last
    and RepVGG's gamma ~ N(0.1, 0.1) included) and which any training or loaded checkpoint moves. Without running
    statistics only the affine parameters can tell: left their (1, 0) start."""
    if bn.track_running_stats and bn.running_mean is not None:
        counted = bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0
        return counted or bool(torch.any(bn.running_mean != 0)) or bool(torch.any(bn.running_var != 1))
    return bn.affine and not (torch.all(bn.weight == 1) and torch.all(bn.bias == 0))


def looks_trained(model: nn.Module, convs: Iterable[str] | None = None) -> str | None:
    """The name of the first BatchNorm fed by one of `convs` (default: repopt.targets.target_convs(model)) that has
    seen training data, or None. A target conv without a BatchNorm gives no signal."""
    from .targets import conv_norms, target_convs

    norms = conv_norms(model)
    for conv in (target_convs(model) if convs is None else convs):
        found = norms.get(conv)
        if found is not None and _bn_trained(found[1]):
            return found[0]
    return None


@torch.no_grad()
def apply_rule_of_initialization(model: nn.Module, bound: dict[str, tuple[nn.Conv2d, BranchSet]],
                                 identity_init: str | float = "searched", force: bool = False,
                                 generator: torch.Generator | None = None) -> None:
    """W'(0) = sum_b alpha_b E_b(W_b(0)) + D(a(0)) for every bound conv (MATH (1), 'Rule of initialization').

    Refuses (ReinitError) when the BatchNorm after a bound conv has seen training data (its running statistics
    moved), since re-initializing would throw that training away; force=True overrides.
    """
    trained = looks_trained(model, bound)
    if trained is not None and not force:
        raise ReinitError(f"BatchNorm {trained!r} has running statistics from training, so the model looks trained; "
                          f"refusing to re-initialize it (pass reinit=False to keep the weights, or "
                          f"force_reinit=True to overwrite them; on the command line: --force-reinit)")
    for conv, bs in bound.values():
        kernel = bs.initial_kernel(identity_init=identity_init, generator=generator, dtype=conv.weight.dtype)
        conv.weight.copy_(kernel.to(conv.weight.device))

