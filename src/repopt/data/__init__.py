"""Datasets for repopt: the embedded handwritten digits, CIFAR-10/100 (torchvision's files, no torchvision needed)
and ImageFolder trees, all held in memory and served as normalized, augmented batches on the training device.

    from repopt.data import load_dataset
    ds = load_dataset("digits")                      # or "cifar10" / "cifar100" / "folder" with data_dir=...
    for x, y in ds.train_batches(128, epoch, seed=0, device="cuda"):
        ...
"""
from __future__ import annotations

from .dataset import Dataset
from .errors import DataError

DATASETS = ("digits", "cifar10", "cifar100", "folder")
# digits are 8x8 originals: 16x16 keeps every detail at a quarter of the compute of 32x32
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "folder": 32}


def load_dataset(name: str, data_dir=None, image_size: int | None = None) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) served at ``image_size`` x ``image_size`` pixels (default
    16 for digits, 32 otherwise).

    ``digits`` is embedded in the package and takes no data_dir; ``cifar10`` / ``cifar100`` read torchvision's
    download folders under ``data_dir``; ``folder`` reads ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``.
    Raises DataError with one sentence naming the problem.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE[name]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    if name == "digits":
        if data_dir is not None:
            raise DataError(f"the digits dataset is embedded in repopt and takes no data_dir (got {data_dir}).")
        from .digits import load_digits
        return load_digits(image_size)
    if name == "folder":
        from .folder import load_image_folder
        return load_image_folder(data_dir, image_size)
    from .cifar import load_cifar
    return load_cifar(name, data_dir, image_size)


__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset"]
