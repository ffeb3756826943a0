"""ImageFolder trees (root/train/<class>/*, root/val/<class>/*) decoded once into memory at the served size.

Decoding uses torchvision.io when torchvision is installed and Pillow otherwise (Pillow alone is enough); either way
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

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
# The loader keeps every image in memory; refuse sets that would not fit rather than swap the machine to death.
MAX_BYTES = 8 << 30
_INSTALL_HINT = "pip install 'repopt[vision]'"


def _backend() -> str:
    try:
        import torchvision.io  # noqa: F401
        return "torchvision"
    except ImportError:
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
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_torchvision(path: Path, size: int) -> torch.Tensor:
    from torchvision import io

    try:
        return io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
    except (RuntimeError, ValueError):  # a format torchvision cannot decode (e.g. BMP, TIFF): Pillow may
        return _decode_pillow(path, size)


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): shorter side to `size`, then centre crop (like Resize+CenterCrop)."""
    h, w = img.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=scale < 1)[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        img = x[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return img


def _scan(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        if not cls_dir.is_dir():
            continue  # a class absent from val is allowed; an empty one is not (checked below)
        found = sorted(p for p in cls_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise DataError(f"class folder {cls_dir} holds no images (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
        files += found
        labels += [label] * len(found)
    return files, labels


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_all(files: list[Path], size: int, backend: str) -> torch.Tensor:
    decode = _decode_torchvision if backend == "torchvision" else _decode_pillow

    def one(path: Path) -> torch.Tensor:
        try:
            return _fit(decode(path, size), size)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure (truncated, not an image): name the file
            raise DataError(f"image {path} could not be read ({type(e).__name__}: {e}).") from None

    # decoders and torch ops release the GIL, so threads overlap the work without worker processes
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return torch.stack(list(pool.map(one, files)))


def load_image_folder(data_dir, image_size: int) -> Dataset:
    """Read ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``) into memory at ``image_size``."""
    if data_dir is None:
        raise DataError("the folder dataset needs data_dir (--data-dir): a directory with train/<class>/ and "
                        "val/<class>/ subfolders of images.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory.")
    train_dir = root / "train"
    val_dir = next((root / v for v in ("val", "test") if (root / v).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise DataError(f"{root} must hold train/ and val/ (or test/) subfolders with one folder per class.")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} holds no class folders.")
    unknown = sorted(set(_class_dirs(val_dir)) - set(classes))
    if unknown:
        raise DataError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(unknown)}.")
    backend = _backend()
    train_files, train_labels = _scan(train_dir, classes)
    val_files, val_labels = _scan(val_dir, classes)
    if not val_files:
        raise DataError(f"{val_dir} holds no images in any class folder.")
    need = (len(train_files) + len(val_files)) * 3 * image_size ** 2
    if need > MAX_BYTES:
        raise DataError(f"{root}: {len(train_files) + len(val_files)} images at {image_size}x{image_size} need "
                        f"{need / 2**30:.1f} GiB in memory, over the in-memory loader's {MAX_BYTES / 2**30:.0f} GiB "
                        f"limit; use a smaller image_size or a subset.")
    train_x = _read_all(train_files, image_size, backend)
    val_x = _read_all(val_files, image_size, backend)
    return Dataset("folder", train_x, torch.tensor(train_labels), val_x, torch.tensor(val_labels), classes,
                   image_size=image_size, flip=True, source=str(root))
