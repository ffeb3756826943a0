"""The embedded default dataset: UCI handwritten digits (8x8, 10 classes), shipped inside the package."""
from __future__ import annotations

import zipfile
from importlib import resources

import numpy as np
import torch

from .dataset import Dataset
from .errors import DataError


def load_digits(image_size: int) -> Dataset:
    """1437 train / 360 test digits (fixed stratified split stored in the file), upsampled to ``image_size``."""
    ref = resources.files("repopt") / "data_files" / "digits.npz"
    try:
        with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
            images, labels, is_test = z["images"], z["labels"], z["is_test"].astype(bool)
    except FileNotFoundError:
        raise DataError(f"{ref} is missing: repopt's package data was not installed; reinstall repopt.") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{ref} is damaged ({e}); reinstall repopt.") from None
    # source pixels count "on" pixels of 4x4 blocks (0..16): rescale to 0..255 like any 8-bit image
    x = torch.from_numpy((images.astype(np.uint16) * 255 + 8) // 16).to(torch.uint8)[:, None]
    y = torch.from_numpy(labels.astype(np.int64))
    test = torch.from_numpy(is_test)
    # flips turn digits into other glyphs; a 1/16 crop shift is about half a source pixel
    return Dataset("digits", x[~test], y[~test], x[test], y[test], [str(d) for d in range(10)],
                   image_size=image_size, flip=False, crop_padding=round(image_size / 16), source=str(ref))
