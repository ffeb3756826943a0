"""Writers for the real on-disk dataset formats (CIFAR pickles as torchvision downloads them, ImageFolder trees,
MNIST / Fashion-MNIST IDX files), shared by the tests."""
from __future__ import annotations

import io
import pickle
import struct

import numpy as np

# ----------------------------------------------------------------------------------
class _Py2Pickler(pickle._Pickler):
    """Emit bytes the way Python 2's cPickle wrote str (BINSTRING), as in the files the CIFAR site distributes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj, path, style):
    if style == "py2":  # keys and names as Python 2 str; arrays referenced through the old numpy.core module
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(_to_py2(obj))
        data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    else:
        data = pickle.dumps(obj, protocol=style)
    path.write_bytes(data)


def _to_py2(obj):
    if isinstance(obj, str):
        return obj.encode("latin1")
    if isinstance(obj, dict):
        return {_to_py2(k): _to_py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_py2(v) for v in obj]
    return obj


CIFAR = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "labels": "labels", "names": "label_names",
                "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": "fine_labels", "names": "fine_label_names", "classes": 100},
}


def write_cifar(root, name, style="py2", per_file=8, seed=0):
    """A tiny CIFAR tree in torchvision's layout; returns {file: (data, labels)}."""
    lay = CIFAR[name]
    folder = root / lay["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for f in lay["train"] + lay["test"]:
        n = per_file * (5 if name == "cifar100" else 1)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, lay["classes"], n)]
        entry = {"batch_label": f, "data": data, lay["labels"]: labels, "filenames": [f"img{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [v // 5 for v in labels]
        _dump(entry, folder / f, style)
        written[f] = (data, labels)
    names = [f"class_{i}" for i in range(lay["classes"])]
    _dump({lay["names"]: names, "num_cases_per_batch": per_file}, folder / lay["meta"], style)
    return written


def write_folder(root, classes=("cat", "dog", "emu"), per_class=3, size=(10, 14)):
    from PIL import Image

    colors = {}
    for split in ("train", "val"):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                color = (40 * k + 10, 200 - 30 * i, 90 + (split == "val") * 50)
                Image.new("RGB", size[::-1], color).save(root / split / cls / f"{i}.png")
                colors[(split, cls, i)] = color
    return colors


def write_jpeg_folder(root, classes=("cat", "dog", "emu"), per_class=4, val_per_class=2, size=(30, 40), seed=0,
                      quality=90):
    """An ImageFolder tree of small JPEGs with smooth random content (varying sizes around `size` = (h, w));
    returns the list of written paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
                low = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
                img = Image.fromarray(low).resize((w, h), Image.BILINEAR)
                path = root / split / cls / f"{i:03d}.jpg"
                img.save(path, quality=quality)
                paths.append(path)
    return paths


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An array in the IDX format (as LeCun's MNIST files): 00 00, type code, ndim, big-endian uint32 dims, data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    head = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx_dataset(folder, n_train=40, n_test=20, size=10, gz=True, classes=10, seed=0):
    """The four MNIST/Fashion-MNIST IDX files (gzipped or not) in `folder`; returns {split: (images, labels)}."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)  # every class present, for balanced subsets
        rng.shuffle(labels)
        for name, array in zip(IDX_FILES[split], (images, labels)):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[split] = (images, labels)
    return written
