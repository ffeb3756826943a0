"""Datasets for repopt: the embedded handwritten digits, CIFAR-10/100 and MNIST / Fashion-MNIST (torchvision's files,
no torchvision needed) and ImageFolder trees (in memory when small, streamed from disk when large), all served as
normalized, augmented batches on the training device.

    from repopt.data import load_dataset
    ds = load_dataset("digits")                      # or "cifar10" / "cifar100" / "folder" with data_dir=...
    for x, y in ds.train_batches(128, epoch, seed=0, device="cuda"):
        ...
"""
from __future__ import annotations

from .dataset import Dataset
from .errors import DataError

DATASETS = ("digits", "cifar10", "cifar100", "folder", "mnist", "fashion-mnist")
# digits are 8x8 originals: 16x16 keeps every detail at a quarter of the compute of 32x32; (Fashion-)MNIST are served
# at their stored 28x28, which five stride-2 stages still reduce to 1x1 (28 -> 14 -> 7 -> 4 -> 2 -> 1)
DEFAULT_IMAGE_SIZE = {"digits": 16, "cifar10": 32, "cifar100": 32, "folder": 32, "mnist": 28, "fashion-mnist": 28}
SERVED_AS_STORED = ("mnist", "fashion-mnist")  # without image_size: the size of the files (28 for the real ones)


def load_dataset(name: str, data_dir=None, image_size: int | None = None, *, train_subset: int | None = None,
                 classes=None, random_erase: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 **folder_options) -> Dataset:
    """Load dataset ``name`` (one of DATASETS) served at ``image_size`` x ``image_size`` pixels (default
    16 for digits, the stored 28 for mnist / fashion-mnist, 32 otherwise).

    ``digits`` is embedded in the package and takes no data_dir; ``cifar10`` / ``cifar100`` read torchvision's
    download folders under ``data_dir``; ``folder`` reads ``data_dir/train/<class>/`` and ``data_dir/val/<class>/``,
    in memory or streamed (``folder_options``: loader, augment, eval_resize, workers, skip_bad, ...; see
    folder.load_image_folder and stream.StreamedFolder). ``mnist`` / ``fashion-mnist`` read the IDX files (flat or
    torchvision's raw/ layout; fashion-mnist defaults to the Debian package's folder, see data/idx.py).
    ``classes``: keep only these classes (indices) in both splits, relabelled 0..k-1 (data/classes.py), before
    ``train_subset``: keep a fixed, class-balanced part of the training split (data/subset.py). ``random_erase`` /
    ``mixup`` / ``cutmix`` add batch-level augmentation to any dataset (batch_aug.py). Raises DataError with one
    sentence naming the problem.
    """
    from .batch_aug import with_batch_augment

    ds = _load(name, data_dir, image_size, folder_options)
    if classes is not None:
        from .classes import select_classes
        ds = select_classes(ds, classes)
    if train_subset is not None:
        from .subset import train_subset as cut
        ds = cut(ds, train_subset)
    return with_batch_augment(ds, random_erase, mixup, cutmix)


def _load(name, data_dir, image_size, folder_options):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if image_size is None and name not in SERVED_AS_STORED:
        image_size = DEFAULT_IMAGE_SIZE[name]
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    if folder_options and name != "folder":
        raise DataError(f"{', '.join(sorted(folder_options))}: image-folder settings, which the {name} dataset does "
                        f"not take.")
    if name == "digits":
        if data_dir is not None:
            raise DataError(f"the digits dataset is embedded in repopt and takes no data_dir (got {data_dir}).")
        from .digits import load_digits
        return load_digits(image_size)
    if name in SERVED_AS_STORED:
        from .idx import load_idx
        return load_idx(name, data_dir, image_size)
    if name == "folder":
        from .folder import load_image_folder
        return load_image_folder(data_dir, image_size, **folder_options)
    from .cifar import load_cifar
    return load_cifar(name, data_dir, image_size)


def serving_options(options: dict | None) -> dict:
    """A run's data options without the training-only batch augmentation: what evaluation, calibration and
    quantization of that run load its dataset with."""
    return {k: v for k, v in (options or {}).items() if k not in ("random_erase", "mixup", "cutmix")}


__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "serving_options"]
