"""Some of a dataset's classes: the two halves of a transfer experiment (pre-train on classes 0-4, fine-tune on 5-9).

Both splits keep only the images of the chosen classes, relabelled 0..k-1 in the order given; the normalization
statistics stay those of the whole dataset, so that the two halves of a transfer see their pixels alike.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .dataset import Dataset
from .errors import DataError


def parse_classes(text: str) -> tuple[int, ...]:
    """'0-4' or '5,7,9' (or a mix, '0-2,7') -> the class indices, in that order."""
    out: list[int] = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise DataError(f"classes {text!r}: expected indices such as 0-4 or 5,7,9.") from None
    return tuple(out)


def select_classes(ds: Dataset, classes: Sequence[int]) -> Dataset:
    """``ds`` with only ``classes`` (indices into ds.class_names) in both splits, relabelled 0..len(classes)-1."""
    if not isinstance(ds, Dataset):  # a streamed folder: point it at a folder holding those classes instead
        raise DataError(f"choosing classes needs the dataset in memory, but {ds.source} is streamed from disk "
                        f"(use --loader memory, or a folder holding only those classes).")
    classes = tuple(int(c) for c in classes)
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if not classes or bad or len(set(classes)) != len(classes):
        why = f"{bad[0]} is not one of its 0..{ds.num_classes - 1}" if bad else \
            "none given" if not classes else "one is given twice"
        raise DataError(f"classes {list(classes)} of {ds.source}: {why}.")
    relabel = torch.full((ds.num_classes,), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))

    def keep(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mine = relabel[labels] >= 0
        return images[mine], relabel[labels[mine]]

    train_x, train_y = keep(ds.train_images, ds.train_labels)
    test_x, test_y = keep(ds.test_images, ds.test_labels)
    names = ", ".join(ds.class_names[c] for c in classes)
    return Dataset(ds.name, train_x, train_y, test_x, test_y, [ds.class_names[c] for c in classes],
                   image_size=ds.image_size, mean=ds.mean, std=ds.std, flip=ds.flip, crop_padding=ds.crop_padding,
                   source=f"{ds.source} (classes {names})")
