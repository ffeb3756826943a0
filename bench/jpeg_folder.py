"""Write a synthetic ImageNet-like JPEG folder for loader benchmarks (not committed data: made on demand).

    python bench/jpeg_folder.py OUT --classes 10 --per-class 50 --val-per-class 10

Each image is 500x375 or 375x500 (ImageNet's most common shapes), JPEG quality 90, with structure at three scales
(coarse colour regions, mid-scale texture, pixel noise) so that it compresses to ~110 KB like an average ImageNet
photo; flat or pure-noise images would decode faster or slower than real ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def synthetic_photo(rng: np.random.Generator, w: int = 500, h: int = 375):
    from PIL import Image

    def layer(step, resample):
        low = rng.integers(0, 256, (h // step + 2, w // step + 2, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(low).resize((w, h), resample)).astype(np.float32)

    img = layer(24, Image.BICUBIC) + 0.45 * (layer(6, Image.BILINEAR) - 128) + rng.normal(0, 10, (h, w, 1))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write(out: Path, classes: int, per_class: int, val_per_class: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
                path = folder / f"img_{i:05d}.JPEG"
                synthetic_photo(rng, w, h).save(path, quality=90)
                total += path.stat().st_size
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    n = a.classes * (a.per_class + a.val_per_class)
    size = write(a.out, a.classes, a.per_class, a.val_per_class, a.seed)
    print(f"{n} JPEGs, {size / n / 1024:.0f} KiB on average, in {a.out}")


if __name__ == "__main__":
    main()
