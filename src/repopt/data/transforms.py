"""Per-image transforms of the streamed loader, as the paper's training code uses them, on Pillow images.

    train   RandomResizedCrop(S, scale 0.08-1, ratio 3/4-4/3, bilinear) at the full-resolution source, horizontal
            flip, then the policy: "rrc-flip" stops there, "raug15" adds the paper's RandAugment-style policy
    eval    shorter side resized to R (default S, the paper's setting; R = 256 for S = 224 is the common variant),
            then the centre S x S

Each transform returns a uint8 (3, S, S) tensor; normalization happens on the training device, in batches. Every
random draw comes from the `random.Random` passed in (seeded per image by the loader), so results are reproducible.

Two back ends give the same pixels: Pillow alone (always), or torchvision's transforms v2 functional ops on the same
Pillow images when torchvision imports (`backend="auto"`). Parameters (crop boxes, flips) are drawn here either way.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from .errors import DataError
from .randaugment import RandAugment15

TRAIN_POLICIES = ("rrc-flip", "raug15", "none")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rrc_box(width: int, height: int, rng: random.Random, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop window: area a uniform fraction of the image within `scale`, aspect
    log-uniform within `ratio`, position uniform; after 10 misses the largest centred window of a clamped aspect."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (w, h) of a resize of the shorter side to `size` (torchvision's rule: the longer side truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def _tv_functional():
    try:
        from torchvision.transforms.v2 import functional
    except Exception:  # noqa: BLE001 - absent, or present but broken against this torch: use Pillow
        return None
    return functional


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "pillow", "torchvision"):
        raise DataError(f"transform backend must be auto, pillow or torchvision, got {backend!r}.")
    if backend == "pillow":
        return backend
    if _tv_functional() is None:
        if backend == "torchvision":
            raise DataError("the torchvision transform backend was asked for but torchvision does not import here; "
                            "use backend 'pillow' or install a torchvision that matches this torch.")
        return "pillow"
    return "torchvision"


class _Ops:
    """The three pixel operations, by back end: crop+resize, resize, crop."""

    def __init__(self, backend: str):
        self.backend = resolve_backend(backend)

    def resized_crop(self, img, box, size: int):
        left, top, w, h = box
        if self.backend == "torchvision":
            from torchvision.transforms import InterpolationMode
            return _tv_functional().resized_crop(img, top, left, h, w, [size, size],
                                                 interpolation=InterpolationMode.BILINEAR, antialias=True)
        from PIL import Image
        return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)

    def resize(self, img, size: int):
        if self.backend == "torchvision":
            from torchvision.transforms import InterpolationMode
            return _tv_functional().resize(img, [size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        from PIL import Image
        return img.resize(resize_shorter(*img.size, size), Image.BILINEAR)

    def center_crop(self, img, size: int):
        if self.backend == "torchvision":
            return _tv_functional().center_crop(img, [size, size])
        return img.crop(center_box(*img.size, size))


def to_tensor(img) -> torch.Tensor:
    """RGB Pillow image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class TrainTransform:
    """RandomResizedCrop + flip (+ raug15) of an RGB Pillow image into a uint8 (3, size, size) tensor."""

    def __init__(self, size: int, policy: str = "rrc-flip", backend: str = "auto"):
        if policy not in TRAIN_POLICIES:
            raise DataError(f"unknown augmentation policy {policy!r}; choose one of {', '.join(TRAIN_POLICIES)}.")
        self.size, self.policy, self.ops = int(size), policy, _Ops(backend)
        self.raug = RandAugment15() if policy == "raug15" else None

    def __call__(self, img, rng: random.Random) -> torch.Tensor:
        img = self.ops.resized_crop(img, rrc_box(*img.size, rng), self.size)
        if rng.random() < 0.5:
            from PIL import Image
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.raug is not None:
            img = self.raug(img, rng)
        return to_tensor(img)

    def __repr__(self) -> str:
        parts = [f"RandomResizedCrop({self.size}, scale={RRC_SCALE}, ratio=(3/4, 4/3), bilinear)",
                 "RandomHorizontalFlip(0.5)"] + ([repr(self.raug)] if self.raug else [])
        return " -> ".join(parts) + f" [{self.ops.backend}]"


class EvalTransform:
    """Shorter side to `resize` (default `size`), then the centre size x size, as a uint8 (3, size, size) tensor."""

    def __init__(self, size: int, resize: int | None = None, backend: str = "auto"):
        self.size, self.resize = int(size), int(resize or size)
        if self.resize < self.size:
            raise DataError(f"the evaluation resize ({self.resize}) must be at least the image size ({self.size}).")
        self.ops = _Ops(backend)

    def __call__(self, img, rng: random.Random | None = None) -> torch.Tensor:
        return to_tensor(self.ops.center_crop(self.ops.resize(img, self.resize), self.size))

    def __repr__(self) -> str:
        return f"Resize({self.resize}, bilinear) -> CenterCrop({self.size}) [{self.ops.backend}]"


def train_transform(size: int, policy: str, backend: str = "auto"):
    """The training transform of `policy`; "none" serves training images like evaluation ones."""
    return EvalTransform(size, backend=backend) if policy == "none" else TrainTransform(size, policy, backend)
