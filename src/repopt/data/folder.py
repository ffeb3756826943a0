"""ImageFolder trees (root/train/<class>/*, root/val/<class>/*): decoded once into memory at the served size when
small, streamed from disk per epoch (stream.py) when large or when a full-resolution augmentation is asked for.

In memory, decoding uses torchvision.io when torchvision is installed and Pillow otherwise (Pillow alone is enough); either way
the image is resized in torch (shorter side to the target, bilinear with antialias, then a centre crop), so both
back ends give the same pixels up to decoder differences.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import Dataset
from .errors import DataError
from .imagefiles import IMAGE_EXTENSIONS, INSTALL_HINT as _INSTALL_HINT, scan_folder, to_rgb  # noqa: F401

LOADERS = ("auto", "memory", "stream")
MEMORY_POLICY = "pad-crop-flip"   # the in-memory loader's batched augmentation
# The in-memory loader keeps every image in memory; refuse sets that would not fit rather than swap the machine to
# death. "auto" streams well before that: decoding a large set up front takes minutes and the memory of the run.
MAX_BYTES = 8 << 30
AUTO_MEMORY_BYTES = 2 << 30


def _backend() -> str:
    try:
        import torchvision.io  # noqa: F401
        return "torchvision"
    except Exception:  # noqa: BLE001 - absent, or installed but broken against this torch
        pass
    try:
        import PIL.Image  # noqa: F401
        return "pillow"
    except ImportError:
        raise DataError(f"reading an image folder needs Pillow or torchvision, and neither is installed: "
                        f"{_INSTALL_HINT}.") from None


def _decode_pillow(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG only: let the decoder downscale by 2/4/8, never below `size`
        arr = np.asarray(to_rgb(im))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_torchvision(path: Path, size: int) -> torch.Tensor:
    from torchvision import io

    try:
        img = io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
        return _decode_pillow(path, size)  # 16-bit PNG: Pillow's path scales it to 8 bits
    except (RuntimeError, ValueError):  # a format torchvision cannot decode (e.g. BMP, TIFF): Pillow may
        return _decode_pillow(path, size)


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): shorter side to `size`, then centre crop (like Resize+CenterCrop)."""
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        # the geometry of the streamed loader's Resize + CenterCrop (transforms.py), so both cut the same window
        from .transforms import center_box, resize_shorter

        nw, nh = resize_shorter(w, h, size)
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=size < min(h, w))[0]
        left, top, _, _ = center_box(nw, nh, size)
        img = x[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return img


def _read_all(files: list[Path], size: int, backend: str) -> torch.Tensor:
    """Every file decoded at `size` into one uint8 (N, 3, size, size) tensor, allocated once (zeroed, so nothing
    uninitialised could ever be read) and filled image by image: the peak is the set plus a few images in flight,
    not a list of images and then their stacked copy (issue 21: 3.4 GB peak for 491 MB of pixels)."""
    decode = _decode_torchvision if backend == "torchvision" else _decode_pillow
    out = torch.zeros((len(files), 3, size, size), dtype=torch.uint8)

    def one(i: int) -> None:
        path = files[i]
        try:
            out[i] = _fit(decode(path, size), size)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure (truncated, not an image): name the file
            raise DataError(f"image {path} could not be read ({type(e).__name__}: {e}).") from None

    # decoders and torch ops release the GIL, so threads overlap the work without worker processes; an error in
    # any image is raised here (and the half-filled tensor dropped)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(one, range(len(files))):
            pass
    return out


def load_image_folder(data_dir, image_size: int, loader: str = "auto", augment: str | None = None,
                      eval_resize: int | None = None, **stream_options):
    """The ImageFolder tree at ``data_dir`` (train/<class>/*, val/<class>/* or test/) served at ``image_size``.

    ``loader``: "memory" decodes every image once at the served size and augments in batches on the device (random
    crop with padding + flip: small sets, CIFAR-style); "stream" decodes per epoch in worker processes with the
    paper's transforms (RandomResizedCrop at full resolution + flip, optionally raug15; stream.py); "auto" streams
    when a streamed policy or setting is asked for or the decoded set would take over AUTO_MEMORY_BYTES. ``augment``:
    the training policy ("pad-crop-flip" in memory; "rrc-flip", "raug15" or "none" streamed; default: the loader's
    first). ``eval_resize``: shorter side before the centre crop in evaluation (streamed; default image_size).
    """
    from .stream import StreamedFolder
    from .transforms import TRAIN_POLICIES

    if loader not in LOADERS:
        raise DataError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}.")
    if augment is not None and augment not in (MEMORY_POLICY, *TRAIN_POLICIES):
        raise DataError(f"unknown augmentation policy {augment!r}; choose one of "
                        f"{', '.join((MEMORY_POLICY, *TRAIN_POLICIES))}.")
    root, classes, train, val, _ = scan_folder(data_dir)
    count = len(train) + len(val)
    need = count * 3 * image_size ** 2
    if loader == "auto":
        wants_stream = augment not in (None, MEMORY_POLICY) or eval_resize not in (None, image_size) \
            or bool(stream_options)
        loader = "stream" if wants_stream or need > AUTO_MEMORY_BYTES else "memory"
    if loader == "stream":
        if augment == MEMORY_POLICY:
            raise DataError(f"the {MEMORY_POLICY} policy is the in-memory loader's; streamed folders use "
                            f"{', '.join(TRAIN_POLICIES)}.")
        return StreamedFolder(root, classes, train, val, image_size, policy=augment or "rrc-flip",
                              eval_resize=eval_resize, **stream_options)
    if augment not in (None, MEMORY_POLICY) or eval_resize not in (None, image_size) or stream_options:
        given = [k for k, v in (("augment", augment), ("eval_resize", eval_resize)) if v is not None]
        raise DataError(f"the in-memory folder loader takes no {', '.join(given + sorted(stream_options))}: "
                        f"those are streamed-loader settings (use loader 'stream' or 'auto').")
    if need > MAX_BYTES:
        raise DataError(f"{root}: {count} images at {image_size}x{image_size} need {need / 2**30:.1f} GiB in "
                        f"memory, over the in-memory loader's {MAX_BYTES / 2**30:.0f} GiB limit; use the streamed "
                        f"loader (loader 'stream' or 'auto').")
    backend = _backend()
    train_x = _read_all([train.path(i) for i in range(len(train))], image_size, backend)
    val_x = _read_all([val.path(i) for i in range(len(val))], image_size, backend)
    return Dataset("folder", train_x, torch.from_numpy(train.labels), val_x, torch.from_numpy(val.labels), classes,
                   image_size=image_size, flip=True, source=str(root))
