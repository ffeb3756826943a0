"""Image folders as file lists: scanning root/<split>/<class>/..., a compact list of paths, and opening one file as an
8-bit RGB Pillow image whatever its mode (CMYK, 16-bit, palette, alpha).

Shared by the in-memory loader (folder.py) and the streamed one (stream.py), so both see the same files in the same
order with the same labels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
INSTALL_HINT = "pip install 'repopt[vision]'"


class FileList:
    """Paths and labels of one split, held as one byte buffer plus offsets rather than a list of str objects.

    A list of 1.28M Python strings costs ~150 MB per process and, worse, every DataLoader worker that touches them
    writes their reference counts and so copies the pages it shares with its parent; numpy buffers are never written.
    """

    def __init__(self, root: Path, relative: list[str], labels: list[int]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in relative]
        self.root = str(root)
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        rel = self._blob[start:int(self._ends[i])].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, rel)


def class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))


def _walk(folder: str) -> list[str]:
    """Image files under `folder` (recursively, hidden entries skipped), relative to it, in sorted order.
    os.scandir reads the file type from the directory entry: no stat per file, which matters for 1.28M files."""
    found = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(folder, rel)) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                name = os.path.join(rel, e.name) if rel else e.name
                if e.is_dir():
                    stack.append(name)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file():
                    found.append(name)
    return sorted(found)


def scan_split(split_dir: Path, classes: list[str], *, required: bool) -> tuple[FileList, list[str]]:
    """(files of `split_dir`, names of the classes it lacks or holds no images for). In a split where every class is
    `required` (train), an empty class folder is an error: a class the model would never see is almost always a
    failed copy. In val a missing or empty class just has no test images."""
    rel, labels, missing = [], [], []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        found = _walk(str(cls_dir)) if cls_dir.is_dir() else []
        if not found:
            if required:
                raise DataError(f"class folder {cls_dir} holds no images (looked for "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))}).")
            missing.append(cls)
            continue
        rel += [os.path.join(cls, f) for f in found]
        labels += [label] * len(found)
    return FileList(split_dir, rel, labels), missing


def scan_folder(data_dir) -> tuple[Path, list[str], FileList, FileList, list[str]]:
    """(root, class names, train files, val files, classes without val images) of an ImageFolder tree
    root/train/<class>/... and root/val/<class>/... (or test/)."""
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
    classes = class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir} holds no class folders.")
    unknown = sorted(set(class_dirs(val_dir)) - set(classes))
    if unknown:
        raise DataError(f"{val_dir} has class folders that {train_dir} lacks: {', '.join(unknown)}.")
    train, _ = scan_split(train_dir, classes, required=True)
    val, missing = scan_split(val_dir, classes, required=False)
    if len(val) == 0:
        raise DataError(f"{val_dir} holds no images in any class folder.")
    return root, classes, train, val, missing


def require_pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading an image folder needs Pillow: {INSTALL_HINT}.") from None
    return Image


def to_rgb(im):
    """An 8-bit RGB copy of a Pillow image of any mode. 16-bit and 32-bit grey are scaled to 8 bits (Pillow's own
    convert clips them, turning most pixels white); palette images go through RGBA so a transparency entry does not
    warn; alpha is dropped the way torchvision's loader drops it (the colour under it is kept)."""
    Image = require_pillow()
    mode = im.mode
    if mode in ("RGB",):
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode != "F":
            a = a / 257.0 if mode.startswith("I;16") or a.max() > 255 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


JPEG_DECODER_ENV = "REPOPT_JPEG_DECODER"
_simplejpeg: object = False  # False: not looked for yet; None: not installed or turned off


def fast_jpeg_decoder():
    """simplejpeg (libjpeg-turbo called directly; the `jpeg` extra) unless REPOPT_JPEG_DECODER=pillow, else None.
    Asked for Pillow's defaults (accurate DCT, smooth chroma upsampling), it decodes the same pixels in 0.82-0.94 of
    open_rgb's time with Pillow (bench/jpeg_decoders.py)."""
    global _simplejpeg
    if _simplejpeg is False:
        choice = os.environ.get(JPEG_DECODER_ENV, "auto")
        if choice not in ("auto", "pillow", "simplejpeg"):
            raise DataError(f"{JPEG_DECODER_ENV}={choice!r}: use auto, pillow or simplejpeg")
        try:
            import simplejpeg
        except ImportError:
            if choice == "simplejpeg":
                raise DataError(f"{JPEG_DECODER_ENV}=simplejpeg, but simplejpeg is not installed: "
                                f"pip install 'repopt[jpeg]'") from None
            simplejpeg = None
        _simplejpeg = None if choice == "pillow" else simplejpeg
    return _simplejpeg


def _decode_jpeg(turbo, data: bytes, max_pixels: int | None):
    """The RGB array of a YCbCr or grey JPEG (baseline or progressive), or None: not a JPEG, another colour space
    (CMYK: Pillow's conversion is the reference), over `max_pixels` (Pillow's decompression-bomb limit, which stays in
    charge), or anything the fast decoder refuses; Pillow then decodes, warns or names the file (a truncated one
    raises there too)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = turbo.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or (max_pixels is not None and height * width > max_pixels):
            return None
        return turbo.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except ValueError:
        return None


def open_rgb(path: str):
    """Decode `path` fully into an 8-bit RGB Pillow image; raises whatever the decoder raises (the callers name the
    file). Truncated files raise: Pillow's LOAD_TRUNCATED_IMAGES stays off, so a half-written JPEG is an error rather
    than a grey-bottomed picture. JPEGs go through the fast decoder when there is one (the same pixels)."""
    Image = require_pillow()
    source = path
    turbo = fast_jpeg_decoder()
    if turbo is not None:
        with open(path, "rb") as f:
            data = f.read()
        decoded = _decode_jpeg(turbo, data, Image.MAX_IMAGE_PIXELS)
        if decoded is not None:
            return Image.fromarray(decoded, "RGB")
        source = io.BytesIO(data)  # what the fast decoder declined, Pillow decodes from the bytes already read
    with Image.open(source) as im:
        im.load()
        return to_rgb(im)
