"""The paper's RandAugment-style policy "raug15", on Pillow images, with an explicit random generator.

What the reference training code does (its RandAugPolicy(magnitude=15), applied after RandomResizedCrop + flip):
two operations per image, each drawn uniformly (with replacement) from the 16 below and always applied, each with its
own integer level drawn uniformly from 0..14 on a scale where 10 is the usual maximum (so levels 11-14 go past the
ranges AutoAugment was designed for: rotations up to 42 degrees, enhancement factors up to 2.62). Geometric operations
fill with grey 128 and resample bilinear or bicubic at random; Cutout fills a square with (125, 122, 113).

Every draw comes from the `random.Random` passed in, so an image's augmentation depends only on that generator's
seed, never on which worker process or rank decodes it.
"""
from __future__ import annotations

import random

MAX_LEVEL = 10.0
NUM_LEVELS = 15           # "raug15": levels 0..14
NUM_OPS = 2
FILL = (128, 128, 128)
CUTOUT_FILL = (125, 122, 113)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")


def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() > 0.5 else v


def level_argument(op: str, level: int, rng: random.Random):
    """The operation's argument at `level` (0..NUM_LEVELS-1); None for the operations that take none. Random signs
    (rotation, shear, translation) are drawn from `rng` here."""
    m = level / MAX_LEVEL
    if op in ("AutoContrast", "Equalize", "Invert"):
        return None
    if op == "Rotate":
        return _signed(m * 30.0, rng)                    # degrees
    if op == "Posterize":
        return int(m * 4)                                 # bits kept: 0..5 (0 keeps nothing: a black image)
    if op == "Solarize":
        return int(m * 256)                               # threshold; >= 256 changes nothing
    if op == "SolarizeAdd":
        return int(m * 110)                               # added below 128
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return m * 1.8 + 0.1                              # enhancement factor, 1 = unchanged
    if op in ("ShearX", "ShearY"):
        return _signed(m * 0.3, rng)
    if op in ("TranslateX", "TranslateY"):
        return _signed(m * 0.45, rng)                     # fraction of the image side
    if op == "Cutout":
        return max(2.0, m * 40.0)                         # side of the square in pixels
    raise ValueError(f"unknown raug15 operation {op!r}")


def _resample(rng: random.Random):
    from PIL import Image

    return rng.choice((Image.BILINEAR, Image.BICUBIC))


def _affine(img, matrix, rng):
    from PIL import Image

    return img.transform(img.size, Image.AFFINE, matrix, resample=_resample(rng), fillcolor=FILL)


def _cutout(img, size: float, rng: random.Random):
    w, h = img.size
    cx, cy, half = rng.randrange(w), rng.randrange(h), int(size) // 2
    box = (max(0, cx - half), max(0, cy - half), min(w, cx + half), min(h, cy + half))
    img = img.copy()
    img.paste(CUTOUT_FILL, box)
    return img


def apply_op(img, op: str, arg, rng: random.Random):
    """One operation on an RGB Pillow image (the reference's definitions)."""
    from PIL import ImageEnhance, ImageOps

    if op == "AutoContrast":
        return ImageOps.autocontrast(img)
    if op == "Equalize":
        return ImageOps.equalize(img)
    if op == "Invert":
        return ImageOps.invert(img)
    if op == "Rotate":
        return img.rotate(arg, resample=_resample(rng), fillcolor=FILL)
    if op == "Posterize":  # a LUT rather than ImageOps.posterize, which refuses 0 bits on current Pillow
        mask = (0xFF << (8 - arg)) & 0xFF if arg < 8 else 0xFF
        return img.point([i & mask for i in range(256)] * 3)
    if op == "Solarize":
        return ImageOps.solarize(img, arg)
    if op == "SolarizeAdd":
        lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
        return img.point(lut * 3)
    if op in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, op)(img).enhance(arg)
    if op == "ShearX":
        return _affine(img, (1, arg, 0, 0, 1, 0), rng)
    if op == "ShearY":
        return _affine(img, (1, 0, 0, arg, 1, 0), rng)
    if op == "TranslateX":
        return _affine(img, (1, 0, arg * img.size[0], 0, 1, 0), rng)
    if op == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, arg * img.size[1]), rng)
    if op == "Cutout":
        return _cutout(img, arg, rng)
    raise ValueError(f"unknown raug15 operation {op!r}")


class RandAugment15:
    """raug15: `num_ops` operations from OPS, each always applied at a level drawn from 0..num_levels-1."""

    def __init__(self, num_ops: int = NUM_OPS, num_levels: int = NUM_LEVELS, ops=OPS):
        self.num_ops, self.num_levels, self.ops = int(num_ops), int(num_levels), tuple(ops)

    def draw(self, rng: random.Random) -> list[tuple[str, int]]:
        return [(rng.choice(self.ops), rng.randrange(self.num_levels)) for _ in range(self.num_ops)]

    def __call__(self, img, rng: random.Random):
        for op, level in self.draw(rng):
            img = apply_op(img, op, level_argument(op, level, rng), rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment15(num_ops={self.num_ops}, levels=0..{self.num_levels - 1} of max {MAX_LEVEL:g})"
