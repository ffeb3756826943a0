"""The paper's Table 4 ablations of RepOpt, as switches of `repopt train` and `repopt pipeline`.

Each one takes exactly one ingredient away and keeps the rest:

    --no-reinit     masks without re-initialisation: the gradient multipliers, but the target convs keep their own
                    default initialization instead of the rule of initialization (paper: 77.42 vs 78.47)
    --no-mask       re-initialisation without masks: the rule of initialization, then the plain optimizer with no
                    multiplier (paper: 77.07)
    --scales ones   all scales 1 (no search): the multipliers and the initialization built from constants 1 for every
                    branch, identity included (paper: 77.59)

and plain SGD (no mask, no re-initialisation) is `--method plain` (paper: 76.91).
"""
from __future__ import annotations

import torch
from torch import nn

ONES = "ones"  # the --scales value that means "every scale 1", not a file (write ./ones for a file named so)


def add_ablation_arguments(p) -> None:
    g = p.add_argument_group("ablations of RepOpt (the paper's Table 4; method repopt only)")
    g.add_argument("--no-reinit", action="store_true",
                   help="keep the target convs' default initialization (no rule of initialization); masks stay")
    g.add_argument("--no-mask", action="store_true",
                   help="apply the rule of initialization, then train with the plain optimizer (no multipliers)")


def check_ablations(cfg) -> str | None:
    """The reason these settings are refused, or None."""
    if (not cfg.reinit or not cfg.mask) and cfg.method != "repopt":
        return "--no-reinit and --no-mask are ablations of RepOpt and need --method repopt"
    if not cfg.reinit and not cfg.mask:
        return ("--no-reinit with --no-mask leaves nothing of RepOpt: that is plain training, --method plain "
                "(with the same recipe)")
    return None


def ones_scales(model: nn.Module):
    """Scale 1 for every branch the hyper-search would give each target conv of `model` (identity included)."""
    from ..scales import Scales
    from ..search import extract_scales, to_hyper_search

    searched_shape = extract_scales(to_hyper_search(model))
    return Scales({name: {b: torch.ones_like(v) for b, v in branches.items()}
                   for name, branches in searched_shape.items()}, {"source": "all ones (no search)"})


def scales_for(cfg, model: nn.Module):
    """The scales of a repopt run: all ones for `--scales ones`, else the file."""
    from ..scales import load_scales

    return ones_scales(model) if cfg.scales == ONES else load_scales(cfg.scales)


def unmasked_repopt(cfg, model: nn.Module, scales, fresh: bool) -> None:
    """`--no-mask`: the rule of initialization only (once, on a fresh run); the caller builds the plain optimizer."""
    from ..reinit import apply_rule_of_initialization

    bound = scales.bind(model)  # the same validation as a masked run: a wrong file still fails by layer name
    if fresh:
        apply_rule_of_initialization(model, bound, identity_init=cfg.identity_init)
