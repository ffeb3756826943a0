"""The training recipe: the paper's numbers, in one place, with where each comes from.

The paper (Ding et al., ICLR 2023) and its code give the peak learning rate **per 256 images** and scale it linearly
with the global batch (its code multiplies base lr, warmup lr and minimum lr by batch x world size / 256): BASE_LR 0.1
is 0.025 at batch 64. `repopt train` follows it: `--lr-base` is that per-256 rate, `--lr` (when given) an absolute peak
rate that overrides it. For the adaptive optimizers, which the paper does not train, the base is scaled by the square
root of the batch ratio (the usual rule for Adam-family optimizers, and timm's default for them).

    source                                  number
    paper code, ImageNet and CIFAR configs  SGD base lr 0.1 per 256 images, linear scaling with the global batch
    paper code, both configs                weight decay 4e-5 (1-D parameters exempt; identity scales decayed in the HS)
    paper code, both configs                nesterov momentum 0.9, label smoothing 0.1, cosine decay per iteration
    paper code, ImageNet config             5 warmup epochs of 120 -> warmup over the first 5/120 of the run
    paper code, HS (CIFAR-100) config       gradient clipping 5.0 in the hyper-search only (never with RepOpt)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerDefaults:
    lr_base: float       # peak learning rate per LR_BASE_SIZE images
    weight_decay: float
    scaling: str         # how lr_base follows the global batch: "linear" or "sqrt"


LR_BASE_SIZE = 256
DEFAULTS = {
    "sgd": OptimizerDefaults(lr_base=0.1, weight_decay=4e-5, scaling="linear"),   # the paper
    # not in the paper: repopt's earlier defaults at batch 64 (2e-3, 2e-4), expressed per 256 images by the sqrt rule
    "adamw": OptimizerDefaults(lr_base=4e-3, weight_decay=0.05, scaling="sqrt"),
    "lion": OptimizerDefaults(lr_base=4e-4, weight_decay=0.5, scaling="sqrt"),
}
WARMUP_FRACTION = 5 / 120      # the paper's ImageNet recipe: 5 warmup epochs of 120
HS_GRAD_CLIP = 5.0             # the paper's hyper-search recipe clips; never while training with RepOpt


def scaled_lr(lr_base: float, global_batch: int, scaling: str, base_size: int = LR_BASE_SIZE) -> float:
    """The peak learning rate for `global_batch` images per step, from a rate given per `base_size` images."""
    ratio = global_batch / base_size
    return lr_base * (ratio if scaling == "linear" else math.sqrt(ratio))


def default_warmup_epochs(epochs: int) -> float:
    return epochs * WARMUP_FRACTION


def describe_lr(lr: float, lr_base: float | None, global_batch: int, scaling: str,
                base_size: int = LR_BASE_SIZE) -> str:
    """'0.025 (0.1 per 256 images x 64/256, linear)' or '0.05 (given with --lr)', for the start of a run."""
    if lr_base is None:
        return f"{lr:g} (given with --lr)"
    rule = f"x {global_batch}/{base_size}" if scaling == "linear" else f"x sqrt({global_batch}/{base_size})"
    return f"{lr:g} ({lr_base:g} per {base_size} images {rule}, {scaling} scaling)"
