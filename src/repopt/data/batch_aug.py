"""Batch-level augmentations on normalized training batches, on the training device: random erasing and
mixup / cutmix with soft targets. Optional, for longer recipes (the paper's ImageNet recipe uses neither).

`with_batch_augment(ds, ...)` wraps any dataset (in-memory or streamed): its train_batches then yield augmented x
and, with mixup or cutmix, y as class probabilities (B, num_classes) instead of labels. `F.cross_entropy` takes such
targets and applies label smoothing to them exactly as the reference code does (smoothing then mixing equals
mixing then smoothing: both are linear).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError


def _step_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    digest = hashlib.sha256(f"repopt.batch_aug/{seed}/{epoch}/{step}/{rank}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_erase(x: torch.Tensor, p: float, rng: np.random.Generator, area=(0.02, 1 / 3), log_ratio=math.log(3.0),
                 ) -> torch.Tensor:
    """With probability `p` per image, replace one rectangle (area fraction uniform in `area`, aspect log-uniform in
    1/3..3) by standard-normal noise: timm's 'pixel' mode, applied after normalization. In place; returns x."""
    b, c, h, w = x.shape
    for i in range(b):
        if rng.random() >= p:
            continue
        for _ in range(10):
            target = h * w * rng.uniform(*area)
            aspect = math.exp(rng.uniform(-log_ratio, log_ratio))
            eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if eh < h and ew < w:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                noise = torch.from_numpy(rng.standard_normal((c, eh, ew), dtype=np.float32))
                x[i, :, top:top + eh, left:left + ew] = noise.to(x.device, x.dtype)
                break
    return x


def mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, rng: np.random.Generator, mixup: float, cutmix: float,
        switch_prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of the batch with its reverse, one lambda ~ Beta(alpha, alpha) per batch (the reference's
    'batch' mode); with both alphas set, cutmix is chosen with probability `switch_prob`. Returns (x, soft targets)."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)  # the share of the image actually kept
    else:
        x = x * lam + x.flip(0) * (1 - lam)
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    return x, one_hot * lam + one_hot.flip(0) * (1 - lam)


class BatchAugmented:
    """A dataset whose training batches get random erasing and/or mixup-cutmix; everything else is forwarded."""

    def __init__(self, ds, random_erase: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        for name, v in (("random erasing probability", random_erase), ("mixup alpha", mixup),
                        ("cutmix alpha", cutmix)):
            if not (math.isfinite(v) and v >= 0) or (name.startswith("random") and v > 1):
                raise DataError(f"the {name} must be a number >= 0{' and <= 1' if name.startswith('random') else ''}"
                                f", got {v}.")
        self.ds, self.random_erase, self.mixup, self.cutmix = ds, float(random_erase), float(mixup), float(cutmix)

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def train_batches(self, batch_size, epoch, seed=0, device="cpu", augment=True, rank=0, world_size=1,
                      drop_last=True):
        batches = self.ds.train_batches(batch_size, epoch, seed=seed, device=device, augment=augment, rank=rank,
                                        world_size=world_size, drop_last=drop_last)
        return batches if not augment else self._augment(batches, seed, epoch, rank)

    def _augment(self, batches, seed, epoch, rank):
        for step, (x, y) in enumerate(batches):
            rng = _step_rng(seed, epoch, step, rank)
            if self.random_erase > 0:
                x = random_erase(x, self.random_erase, rng)
            if self.mixup > 0 or self.cutmix > 0:
                x, y = mix(x, y, self.ds.num_classes, rng, self.mixup, self.cutmix)
            yield x, y

    def __repr__(self) -> str:
        return (f"{self.ds!r} + batch augment(random_erase={self.random_erase}, mixup={self.mixup}, "
                f"cutmix={self.cutmix})")


def with_batch_augment(ds, random_erase: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
    if not (random_erase or mixup or cutmix):
        return ds
    return BatchAugmented(ds, random_erase, mixup, cutmix)
