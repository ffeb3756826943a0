"""Streamed image folders: the same images as the in-memory loader where both can serve them, independence from the
number of workers and ranks, and every kind of bad file (named, converted, or skipped and counted; never a hang)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

sys.path.insert(0, str(Path(__file__).parent))
from formats import write_jpeg_folder  # noqa: E402

from repopt.data import DataError, load_dataset  # noqa: E402
from repopt.data import stream as stream_module  # noqa: E402
from repopt.data.imagefiles import open_rgb  # noqa: E402
from repopt.data.stream import StreamedFolder  # noqa: E402


def stream(root, size=16, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("timeout", 60)
    return load_dataset("folder", root, size, loader="stream", **kw)


def epoch(batches):
    return [(x.clone(), y.clone()) for x, y in batches]


def pixels(ds, x):
    """Normalized batch -> 0..255 values, to compare loaders that normalize differently."""
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root, per_class=5, val_per_class=3)
    return root


def test_auto_picks_the_loader_and_policies_are_checked(tree):
    assert type(load_dataset("folder", tree, 16)).__name__ == "Dataset"  # small: in memory
    assert isinstance(load_dataset("folder", tree, 16, augment="raug15"), StreamedFolder)
    with pytest.raises(DataError, match="in-memory folder loader takes no augment"):
        load_dataset("folder", tree, 16, loader="memory", augment="raug15")
    with pytest.raises(DataError, match="pad-crop-flip policy is the in-memory loader's"):
        stream(tree, augment="pad-crop-flip")
    with pytest.raises(DataError, match="image-folder settings"):
        load_dataset("digits", workers=2)


def test_streamed_and_in_memory_serve_the_same_images_without_augmentation(tree):
    # 24 px from 30-38 px JPEGs: the in-memory loader's JPEG draft (DCT downscaling of images at least twice the
    # served size, for speed) stays off, so both decode the full image
    mem = load_dataset("folder", tree, 24, loader="memory")
    st = stream(tree, 24, augment="none")
    assert (st.num_train, st.num_test, st.class_names) == (mem.num_train, mem.num_test, mem.class_names)
    a = epoch(mem.train_batches(4, 1, seed=3, augment=False))
    b = epoch(st.train_batches(4, 1, seed=3))  # policy "none": training images served like evaluation ones
    assert len(a) == len(b) == st.steps_per_epoch(4) == 15 // 4
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)  # same permutation, same labels in the same order
        # same picture: torch's antialiased bilinear (in memory) vs Pillow's (streamed) differ by rounding only
        diff = (pixels(mem, xa) - pixels(st, xb)).abs()
        assert diff.mean() < 0.5 and diff.max() < 8
    ta, tb = next(iter(mem.test_batches(100))), next(iter(st.test_batches(100)))
    assert torch.equal(ta[1], tb[1]) and (pixels(mem, ta[0]) - pixels(st, tb[0])).abs().mean() < 0.5


def test_same_batches_whatever_the_number_of_workers_and_ranks(tree):
    one = epoch(stream(tree, augment="raug15").train_batches(6, 2, seed=1))
    two = stream(tree, augment="raug15", workers=2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(one, epoch(two.train_batches(6, 2, seed=1))))
    ranks = [epoch(two.train_batches(3, 2, seed=1, rank=r, world_size=2)) for r in range(2)]
    for i, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), x)
        assert torch.equal(torch.cat([ranks[0][i][1], ranks[1][i][1]]), y)
    # each image once per epoch across ranks; another epoch, another order and other crops
    seen = torch.cat([y for r in ranks for _, y in r])
    assert len(seen) == 12 and not torch.equal(one[0][0], epoch(two.train_batches(6, 3, seed=1))[0][0])
    shards = [torch.cat([y for _, y in two.test_batches(2, rank=r, world_size=2)]) for r in range(2)]
    assert torch.equal(torch.cat(shards), torch.cat([y for _, y in two.test_batches(4)]))
    assert len(two.calibration_batches(2, 4)) == 2


# -- bad files -----------------------------------------------------------------------------------------------------
def test_image_modes_are_converted(tmp_path):
    a16 = (np.arange(20 * 30, dtype=np.uint32).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    got = np.asarray(open_rgb(str(tmp_path / "grey16.png")))
    assert got.shape == (20, 30, 3) and got[..., 0].max() == round(a16.max() / 257) and (got[..., 0] == got[..., 1]).all()
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert open_rgb(str(tmp_path / "cmyk.jpg")).getpixel((3, 3))[0] > 200  # red stays red
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    assert open_rgb(str(tmp_path / "palette.png")).getpixel((1, 1)) == (10, 200, 30)
    Image.new("RGBA", (8, 8), (50, 60, 70, 0)).save(tmp_path / "alpha.png")
    Image.new("LA", (8, 8), (90, 255)).save(tmp_path / "la.png")
    assert open_rgb(str(tmp_path / "alpha.png")).getpixel((0, 0)) == (50, 60, 70)  # alpha dropped, as torchvision
    assert open_rgb(str(tmp_path / "la.png")).getpixel((0, 0)) == (90, 90, 90)


def _bad_tree(tmp_path):
    root = tmp_path / "bad"
    write_jpeg_folder(root, per_class=3, val_per_class=1)
    good = (root / "train" / "cat" / "000.jpg").read_bytes()
    (root / "train" / "cat" / "001.jpg").write_bytes(good[: len(good) // 2])    # truncated JPEG
    (root / "train" / "dog" / "002.jpg").write_text("not an image at all")       # non-image with an image name
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_images_are_named_or_skipped_and_counted(tmp_path, workers):
    root = _bad_tree(tmp_path)
    with pytest.raises(DataError, match=r"image .*(001|002)\.jpg could not be read .*--skip-bad-images"):
        epoch(stream(root, workers=workers).train_batches(9, 0))
    logged = []
    ds = stream(root, workers=workers, skip_bad=True, log=logged.append)
    got = epoch(ds.train_batches(9, 0))
    assert ds.num_train == 9 and sum(len(y) for _, y in got) == 7 and ds.skipped["train"] == 2
    assert any("001.jpg" in m for m in logged) and any("002.jpg" in m for m in logged)
    assert "skipped 2 unreadable train images in this pass" in logged[-1]


def test_empty_and_missing_class_folders(tmp_path):
    root = tmp_path / "f"
    write_jpeg_folder(root, per_class=2, val_per_class=1)
    for f in (root / "val" / "dog").iterdir():
        f.unlink()  # an empty val class: that class just has no test images
    (root / "val" / "emu").rename(tmp_path / "away")  # a class in train but not in val: allowed too
    ds = stream(root)
    assert ds.num_classes == 3 and ds.num_test == 1
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*train/dog holds no images"):
        stream(root)


def test_a_worker_that_dies_is_reported_with_its_file(tmp_path, monkeypatch):
    root = tmp_path / "f"
    write_jpeg_folder(root, per_class=2, val_per_class=1)
    real = stream_module.open_rgb

    def killer(path):
        if path.endswith("dog/001.jpg"):
            os.kill(os.getpid(), signal.SIGKILL)  # a decoder crash takes the worker process down
        return real(path)

    monkeypatch.setattr(stream_module, "open_rgb", killer)  # workers are forked after this: they inherit it
    start = time.monotonic()
    with pytest.raises(DataError, match=r"worker failed on the train set while reading .*dog/001\.jpg"):
        epoch(stream(root, workers=1, timeout=60).train_batches(6, 0))
    assert time.monotonic() - start < 60


def test_a_worker_that_hangs_times_out_with_its_file(tmp_path, monkeypatch):
    root = tmp_path / "f"
    write_jpeg_folder(root, per_class=2, val_per_class=1)
    real = stream_module.open_rgb

    def sleeper(path):
        if path.endswith("emu/000.jpg"):
            time.sleep(30)
        return real(path)

    monkeypatch.setattr(stream_module, "open_rgb", sleeper)
    with pytest.raises(DataError, match=r"while reading .*emu/000\.jpg: DataLoader timed out"):
        epoch(stream(root, workers=1, timeout=2).train_batches(6, 0))
