"""What the `jpeg` extra (simplejpeg, libjpeg-turbo called directly) buys the streamed loader. Timed side by side:
repopt.data.imagefiles.open_rgb (one file to an RGB Pillow image, what every DataLoader worker calls) with Pillow's
decoder and with the fast one; simplejpeg alone, handing over a Pillow image (open_rgb's fast path without its
checks) and the bare array (an upper bound: it would need transforms that take arrays, and Pillow's resize would no
longer define the pixels); and a whole training worker's work per image (decode + RandomResizedCrop(224) + flip +
raug15) with either decoder. Same files, alternating file by file so all see the same machine load; CPU time of this
process per image, median of --repeats passes; and whether the pixels are identical.

    python bench/jpeg_folder.py /tmp/inet --classes 8 --per-class 40 --val-per-class 10
    pip install -e ".[jpeg]"
    python bench/jpeg_decoders.py /tmp/inet --files 120

simplejpeg is asked for Pillow's defaults (accurate integer DCT, smooth chroma upsampling), so the pixels can match;
its faster DCT and upsampling would change them.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from repopt.data import imagefiles
from repopt.data.imagefiles import open_rgb, require_pillow
from repopt.data.transforms import TrainTransform


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an image folder (class subfolders of JPEGs), e.g. from jpeg_folder.py")
    ap.add_argument("--files", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    try:
        import simplejpeg
    except ImportError:
        print("simplejpeg is not installed: pip install -e '.[jpeg]'", file=sys.stderr)
        return 2
    Image = require_pillow()
    torch.set_num_threads(1)  # as in a DataLoader worker
    files = sorted(str(p) for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:args.files]
    if not files:
        print(f"no JPEG files under {args.folder}", file=sys.stderr)
        return 2

    def turbo(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            return simplejpeg.decode_jpeg(f.read(), colorspace="RGB", fastdct=False, fastupsample=False)

    def open_rgb_with(decoder):
        def decode(path: str):
            imagefiles._simplejpeg = decoder  # None: Pillow, as REPOPT_JPEG_DECODER=pillow
            return open_rgb(path)
        return decode

    def worker_with(decoder):  # what a training worker does per image: decode + RandomResizedCrop + flip + raug15
        transform = TrainTransform(224, "raug15", "pillow")
        decode = open_rgb_with(decoder)
        return lambda path: transform(decode(path), random.Random(path))

    ways = {
        "Pillow image, Pillow (open_rgb)": open_rgb_with(None),
        "Pillow image, open_rgb [jpeg]": open_rgb_with(simplejpeg),
        "Pillow image, simplejpeg": lambda path: Image.fromarray(turbo(path), "RGB"),
        "bare array, simplejpeg": turbo,
        "worker (raug15 at 224), Pillow": worker_with(None),
        "worker (raug15 at 224), [jpeg]": worker_with(simplejpeg),
    }
    same = sum(np.array_equal(np.asarray(open_rgb_with(None)(f)), turbo(f)) for f in files)
    passes: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        spent = dict.fromkeys(ways, 0.0)
        order = list(ways.items())
        for i, path in enumerate(files):  # file by file; who touches a file first (and pays its cache misses) rotates
            for name, decode in order[i % len(order):] + order[:i % len(order)]:
                t = time.process_time()
                decode(path)
                spent[name] += time.process_time() - t
        for name in ways:
            passes[name].append(spent[name] / len(files))
    kib = sum(os.path.getsize(f) for f in files) / len(files) / 1024
    print(f"{len(files)} JPEGs of {kib:.0f} KiB on average; simplejpeg {simplejpeg.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"identical pixels (Pillow vs simplejpeg): {same} of {len(files)} files")
    for name, times in passes.items():
        base = passes["worker (raug15 at 224), Pillow" if name.startswith("worker") else
                      "Pillow image, Pillow (open_rgb)"]
        ratios = [t / b for t, b in zip(times, base)]
        print(f"  {name:<34} {statistics.median(times) * 1e3:6.3f} ms per image   / with Pillow "
              f"{statistics.median(ratios):.2f} (passes {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
