"""MNIST and Fashion-MNIST from their IDX files (gzipped or not), without torchvision.

Where the four files are looked for, under ``data_dir``: the folder itself (a flat folder, e.g. Debian's
/usr/share/datasets/fashion-mnist), ``raw/`` in it, and torchvision's download layout ``FashionMNIST/raw/`` or
``MNIST/raw/``. Each file may be stored as ``NAME`` or ``NAME.gz`` (gzip is recognized by its magic bytes, not its
name). Without ``data_dir``, fashion-mnist is read from the Debian package's folder.

The IDX format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, one big-endian uint32 per
dimension, then the values in C order, big-endian.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset
from .errors import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # where `apt-get install dataset-fashion-mnist` puts it
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"  # Debian / Ubuntu (run `apt-get update` once first)

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CLASSES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
# IDX type code -> numpy dtype of the stored (big-endian) values
_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (gzipped or not); DataError naming the file if it is not a whole IDX file.

    The header is read first and then exactly the payload it declares, in chunks: a gzip that expands beyond that
    (a few KB can expand to many GB) is refused after one byte more, and memory follows the bytes the file really
    holds, never the size its header claims."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            size = path.stat().st_size
            if gzipped:
                return _parse(path, gzip.GzipFile(fileobj=f, mode="rb"), None, _MAX_DEFLATE_RATIO * size + 1024)
            return _parse(path, f, size, None)
    except OSError as e:  # also gzip.BadGzipFile
        raise DataError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    except (EOFError, zlib.error):
        raise DataError(f"{path} is a truncated or damaged gzip file.") from None


def _parse(path: Path, stream, file_size: int | None, most: int | None) -> np.ndarray:
    """The array in `stream` (file_size: the size of an uncompressed file, checked before its payload is read; most:
    the most bytes a gzipped file can inflate to, so that a header declaring more is refused before inflating)."""
    start = _read_at_most(stream, 4)
    if len(start) < 4 or start[0] != 0 or start[1] != 0 or start[2] not in _TYPES:
        raise DataError(f"{path} is not an IDX file (its first bytes {start.hex(' ') or 'are missing'}; an IDX "
                        f"file starts with 00 00, a type code such as 08, and the number of dimensions).")
    dtype, ndim = _TYPES[start[2]], start[3]
    dims = _read_at_most(stream, 4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise DataError(f"{path} is truncated: its IDX header declares {ndim} dimensions but the file ends first.")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    header = 4 + 4 * ndim
    expected = header + int(np.prod(shape, dtype=object)) * dtype.itemsize  # object: no int64 overflow
    if most is not None and expected > most:  # a header claiming terabytes: refused before inflating a byte of it
        raise DataError(f"{path} is truncated: its header declares shape {shape} ({expected} bytes), more than a "
                        f"gzip file of {path.stat().st_size} bytes can inflate to.")
    held = file_size
    if held is None or held == expected:
        payload = _read_at_most(stream, expected - header)
        held = header + len(payload)
        if held == expected and stream.read(1):
            raise DataError(f"{path} is longer than its header says: its header declares shape {shape} "
                            f"({expected} bytes) but it holds more.")
    if held != expected:
        state = "truncated" if held < expected else "longer than its header says"
        raise DataError(f"{path} is {state}: its header declares shape {shape} ({expected} bytes) but it holds "
                        f"{held} bytes.")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


_CHUNK = 1 << 20
_MAX_DEFLATE_RATIO = 1032  # deflate's limit: one 258-byte match per (at best) 2 bits


def _read_at_most(stream, n: int) -> bytearray:
    """Up to `n` bytes of `stream`, read in chunks (a header may declare far more than the file holds)."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(min(n - len(out), _CHUNK))
        if not chunk:
            break
        out += chunk
    return out


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_folder(name: str, data_dir) -> Path:
    """The folder holding the four IDX files of ``name`` under ``data_dir`` (see the module docstring)."""
    if data_dir is None:
        if name != "fashion-mnist":
            raise DataError(f"{name} needs --data-dir: a folder holding its four IDX files (train-images-idx3-ubyte"
                            f"[.gz], ...) or torchvision's {_TORCHVISION_FOLDER[name]}/raw/ under it.")
        root = Path(FASHION_MNIST_DIR)
        if not root.is_dir():
            raise DataError(f"Fashion-MNIST is not installed in {root}: install it with `{INSTALL_HINT}` "
                            f"(Debian/Ubuntu), or pass --data-dir with its four IDX files or torchvision's "
                            f"FashionMNIST/raw/ under it.")
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist or is not a directory.")
    candidates = [root, root / "raw", root / _TORCHVISION_FOLDER[name] / "raw"]
    for folder in candidates:
        if all(_find(folder, f) for pair in _FILES.values() for f in pair):
            return folder
    for folder in candidates:  # name what is missing in the folder that holds some of the files
        present = [f for pair in _FILES.values() for f in pair if _find(folder, f)]
        if present:
            missing = [f for pair in _FILES.values() for f in pair if f not in present]
            raise DataError(f"{folder} holds only part of {name}: {', '.join(missing)} (or .gz) is missing.")
    hint = f"; install it with `{INSTALL_HINT}`" if name == "fashion-mnist" else ""
    raise DataError(f"{root} holds no {name} IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                    f"t10k-...), neither flat nor in torchvision's {_TORCHVISION_FOLDER[name]}/raw/ layout{hint}.")


def _split(folder: Path, split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_path, label_path = (_find(folder, f) for f in _FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise DataError(f"{image_path} should hold uint8 images of shape (N, S, S), but holds {images.dtype} of "
                        f"shape {images.shape}.")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{label_path} should hold one uint8 label per image, but holds {labels.dtype} of shape "
                        f"{labels.shape}.")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{label_path} holds {labels.shape[0]} labels but {image_path.name} holds "
                        f"{images.shape[0]} images.")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{label_path}: labels must lie in [0, {num_classes}), found {int(labels.max())}.")
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def load_idx(name: str, data_dir, image_size: int | None = None) -> Dataset:
    """``mnist`` or ``fashion-mnist`` (60,000 train / 10,000 test 28x28 grey images, 10 classes)."""
    folder = find_idx_folder(name, data_dir)
    classes = _CLASSES[name]
    train_x, train_y = _split(folder, "train", len(classes))
    test_x, test_y = _split(folder, "test", len(classes))
    if train_x.shape[-1] != test_x.shape[-1]:
        raise DataError(f"{folder}: the train images are {train_x.shape[-1]} px wide but the t10k images "
                        f"{test_x.shape[-1]} px; both files must hold one size.")
    image_size = image_size or int(train_x.shape[-1])  # default: as stored (28 for the real files)
    # mirrored digits are other glyphs (no flip for MNIST); a mirrored garment is the same garment (Fashion-MNIST's
    # classes are left/right symmetric: a left shoe mirrored is a right shoe, both "Sneaker"). The crop pads 1/14 of
    # the side (2 px at 28): the objects are centred and fill the frame, so larger shifts would cut them off.
    return Dataset(name, train_x, train_y, test_x, test_y, classes, image_size=image_size,
                   flip=name == "fashion-mnist", crop_padding=round(image_size / 14), source=str(folder))
