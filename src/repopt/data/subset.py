"""A fixed, class-balanced part of a training split: the smaller training sets of the CPU-sized experiments."""
from __future__ import annotations

import torch

from .dataset import Dataset
from .errors import DataError

SUBSET_SEED = 0  # the same images for every run, seed and method: only the training seed varies between runs


def train_subset(ds: Dataset, n: int) -> Dataset:
    """``ds`` with its training split cut to ``n`` images, as equal per class as the classes allow.

    The images are drawn from one fixed permutation (SUBSET_SEED), so the subset does not depend on the training
    seed; the test split and the normalization statistics stay those of the whole dataset.
    """
    if not isinstance(ds, Dataset):  # a streamed folder: its images are files read per epoch, not tensors to index
        raise DataError(f"a training subset needs the dataset in memory, but {ds.source} is streamed from disk "
                        f"(use --loader memory, or a folder holding the subset).")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"the training subset must be a positive number of images, got {n!r}.")
    if n >= ds.num_train:
        if n > ds.num_train:
            raise DataError(f"a training subset of {n} images was asked for, but {ds.source} has only "
                            f"{ds.num_train} training images.")
        return ds
    order = torch.randperm(ds.num_train, generator=torch.Generator().manual_seed(SUBSET_SEED))
    labels = ds.train_labels[order]
    counts = torch.bincount(labels, minlength=ds.num_classes)
    quota = torch.zeros_like(counts)
    left = n
    # fill the classes evenly; a class with too few images gives its share to the others
    while left:
        open_classes = (quota < counts).nonzero().flatten()
        share = max(left // len(open_classes), 1)
        for c in open_classes.tolist():
            take = min(share, int(counts[c] - quota[c]), left)
            quota[c] += take
            left -= take
            if not left:
                break
    rank = torch.zeros_like(labels)  # position of each image among its class's images, in permutation order
    for c in range(ds.num_classes):
        mask = labels == c
        rank[mask] = torch.arange(int(mask.sum()))
    keep = order[rank < quota[labels]]  # keeps the permutation order, so the classes stay interleaved
    return Dataset(ds.name, ds.train_images[keep], ds.train_labels[keep], ds.test_images, ds.test_labels,
                   ds.class_names, image_size=ds.image_size, mean=ds.mean, std=ds.std, flip=ds.flip,
                   crop_padding=ds.crop_padding, source=f"{ds.source} (training subset of {n})")
