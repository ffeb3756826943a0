"""The optional fast JPEG decoder (the `jpeg` extra, simplejpeg) decodes the same pixels as Pillow, hands Pillow
whatever it should not or cannot decode, and changes nothing a streamed epoch serves."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

sys.path.insert(0, str(Path(__file__).parent))
from formats import write_jpeg_folder  # noqa: E402

from repopt.data import DataError, load_dataset  # noqa: E402
from repopt.data import imagefiles  # noqa: E402
from repopt.data.imagefiles import open_rgb  # noqa: E402


@pytest.fixture
def decoder(monkeypatch):
    """decoder(name): the decoder open_rgb uses from now on, chosen as a user would (REPOPT_JPEG_DECODER)."""
    def choose(name: str):
        monkeypatch.setenv(imagefiles.JPEG_DECODER_ENV, name)
        monkeypatch.setattr(imagefiles, "_simplejpeg", False)  # looked up again, as in a new process
        return imagefiles.fast_jpeg_decoder()

    yield choose
    monkeypatch.setattr(imagefiles, "_simplejpeg", False)


def _image(h=45, w=61, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8))


KINDS = {  # name: (how it is written, does the fast decoder take it)
    "4:2:0": (lambda im, p: im.save(p, quality=90, subsampling=2), True),
    "4:4:4": (lambda im, p: im.save(p, quality=95, subsampling=0), True),
    "progressive": (lambda im, p: im.save(p, quality=85, progressive=True), True),
    "grey": (lambda im, p: im.convert("L").save(p, quality=90), True),
    "cmyk": (lambda im, p: im.convert("CMYK").save(p, quality=90), False),
    "png named .jpg": (lambda im, p: im.save(p, format="PNG"), False),
}


@pytest.mark.parametrize("kind", KINDS)
def test_same_pixels_as_pillow_and_only_where_it_should(kind, tmp_path, decoder, monkeypatch):
    turbo = pytest.importorskip("simplejpeg")
    path = tmp_path / "x.jpg"
    write, fast = KINDS[kind]
    write(_image(), path)
    assert decoder("pillow") is None
    want = np.asarray(open_rgb(str(path)))
    assert decoder("auto") is turbo
    calls = []
    real = turbo.decode_jpeg
    monkeypatch.setattr(turbo, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = open_rgb(str(path))
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want), kind
    assert bool(calls) is fast, f"{kind}: the fast decoder was {'not ' if fast else ''}used"


def test_a_truncated_jpeg_still_raises(tmp_path, decoder):
    pytest.importorskip("simplejpeg")
    path = tmp_path / "cut.jpg"
    _image().save(path, quality=90)
    path.write_bytes(path.read_bytes()[:-200])
    for name in ("pillow", "auto"):
        decoder(name)
        with pytest.raises(OSError, match="truncated"):
            open_rgb(str(path))


def test_pillows_decompression_bomb_guard_still_applies(tmp_path, decoder, monkeypatch):
    pytest.importorskip("simplejpeg")
    path = tmp_path / "big.jpg"
    _image().save(path, quality=90)
    decoder("auto")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 45 * 61 // 3)  # this 45x61 picture is over twice the limit
    with pytest.raises(Image.DecompressionBombError):
        open_rgb(str(path))


def test_the_choice_is_checked(decoder, monkeypatch, tmp_path):
    write_jpeg_folder(tmp_path, per_class=1, val_per_class=1)
    with pytest.raises(DataError, match="REPOPT_JPEG_DECODER='turbo': use auto, pillow or simplejpeg"):
        decoder("turbo")
    with pytest.raises(DataError, match="use auto, pillow or simplejpeg"):  # before any worker starts
        load_dataset("folder", tmp_path, 16, loader="stream", workers=0)
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # as if it were not installed
    assert decoder("auto") is None
    with pytest.raises(DataError, match=r"not installed: pip install 'repopt\[jpeg\]'"):
        decoder("simplejpeg")


def test_a_streamed_epoch_is_the_same_with_either_decoder(tmp_path, decoder):
    pytest.importorskip("simplejpeg")
    write_jpeg_folder(tmp_path, per_class=4, val_per_class=2)

    def epoch():
        ds = load_dataset("folder", tmp_path, 16, loader="stream", augment="raug15", workers=0, timeout=60)
        train = [(x.clone(), y.clone()) for x, y in ds.train_batches(4, 1, seed=2)]
        return train + [(x.clone(), y.clone()) for x, y in ds.test_batches(3)]

    decoder("pillow")
    want = epoch()
    decoder("simplejpeg")
    got = epoch()
    assert len(got) == len(want) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                         for a, b in zip(got, want))
