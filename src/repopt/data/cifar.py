"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format (the python-pickle release), without torchvision."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset
from .errors import DataError
from .safe_pickle import load_plain_pickle

# Per-channel statistics of the 50,000 training images, in [0, 1] units (the values published with most CIFAR code).
_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "meta": "batches.meta", "labels": "labels", "names": "label_names", "classes": 10,
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python", "train": ["train"], "test": ["test"],
        "meta": "meta", "labels": "fine_labels", "names": "fine_label_names", "classes": 100,
        "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762),
    },
}
_PIXELS = 3 * 32 * 32


def _find_folder(name: str, data_dir, layout: dict) -> Path:
    folder = layout["folder"]
    if data_dir is None:
        raise DataError(f"{name} needs a data directory holding {folder}/ (torchvision's download format); "
                        f"pass data_dir (--data-dir).")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist or is not a directory.")
    if (root / folder).is_dir():
        return root / folder
    if root.name == folder or (root / layout["meta"]).is_file():  # data_dir is the CIFAR folder itself
        return root
    raise DataError(f"{root} holds no {folder}/ folder; point data_dir at the directory that contains it "
                    f"(torchvision's {name} download format).")


def _plain_dict(path: Path) -> dict:
    obj = load_plain_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path} should hold a dict but holds a {type(obj).__name__}.")
    # files re-saved from Python 3 may carry bytes keys; the originals decode to str under latin1
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(path: Path, layout: dict) -> list[str]:
    meta = _plain_dict(path)
    names = meta.get(layout["names"])
    if not isinstance(names, (list, tuple)) or len(names) != layout["classes"]:
        found = len(names) if isinstance(names, (list, tuple)) else "no"
        raise DataError(f"{path} should list {layout['classes']} class names under '{layout['names']}', "
                        f"found {found}.")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _batch(path: Path, layout: dict) -> tuple[np.ndarray, np.ndarray]:
    d = _plain_dict(path)
    for key in ("data", layout["labels"]):
        if key not in d:
            raise DataError(f"{path} has no '{key}' entry (keys: {', '.join(map(str, d))}).")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _PIXELS:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be an array of shape (N, {_PIXELS}) (32x32 RGB, channel-major), "
                        f"got {shape}.")
    if data.dtype != np.uint8:
        if not np.issubdtype(data.dtype, np.integer) or (data.size and (data.min() < 0 or data.max() > 255)):
            raise DataError(f"{path}: 'data' must hold bytes (uint8 0..255), got dtype {data.dtype}.")
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(d[layout["labels"]], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{layout['labels']}' must be a list of integers.") from None
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path} holds {data.shape[0]} images but {labels.shape[0]} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= layout["classes"]):
        raise DataError(f"{path}: labels must lie in [0, {layout['classes']}), found "
                        f"{labels.min()}..{labels.max()}.")
    return data, labels


def _split(folder: Path, files: list[str], layout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_batch(folder / f, layout) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    # the rows are stored channel-major (1024 R, 1024 G, 1024 B), i.e. already CHW
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def load_cifar(name: str, data_dir, image_size: int) -> Dataset:
    """Read ``cifar10`` or ``cifar100`` from ``data_dir`` (the folder holding cifar-*-python* or that folder itself)."""
    layout = _LAYOUTS[name]
    folder = _find_folder(name, data_dir, layout)
    missing = [f for f in [*layout["train"], *layout["test"], layout["meta"]] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} is missing {', '.join(missing)} (expected torchvision's {name} layout).")
    names = _names(folder / layout["meta"], layout)
    train_x, train_y = _split(folder, layout["train"], layout)
    test_x, test_y = _split(folder, layout["test"], layout)
    return Dataset(name, train_x, train_y, test_x, test_y, names, image_size=image_size,
                   mean=layout["mean"], std=layout["std"], flip=True, source=str(folder))
