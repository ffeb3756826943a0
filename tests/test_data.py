"""repopt.data: the embedded digits, CIFAR pickles (written here in the real formats), image folders, batching."""
from __future__ import annotations

import io
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from repopt.data import DATASETS, DataError, Dataset, load_dataset
from repopt.data.safe_pickle import load_plain_pickle


from formats import CIFAR, _dump, write_cifar, write_folder  # noqa: E402


def small_dataset(n_train=37, n_test=11, size=8, **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train + n_test, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 5, (n_train + n_test,), generator=g)
    return Dataset("toy", x[:n_train], y[:n_train], x[n_train:], y[n_train:], list("abcde"), **kw)


def _epoch(ds, *args, **kw):
    return [(x.clone(), y.clone()) for x, y in ds.train_batches(*args, **kw)]


# -- digits -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_classes_and_normalization(digits):
    assert (digits.name, digits.num_classes, digits.num_train, digits.num_test) == ("digits", 10, 1437, 360)
    assert digits.class_names == tuple("0123456789") and digits.image_size == 16 and digits.in_channels == 3
    assert not digits.flip  # mirrored digits are different glyphs
    assert torch.bincount(digits.test_labels).tolist() == [36] * 10
    xs, ys = zip(*digits.train_batches(256, 0, augment=False, drop_last=False))
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (1437, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale repeated
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01  # stats of the served train set
    assert len(digits.mean) == len(digits.std) == 3
    test = list(digits.test_batches(100))
    assert [len(b[1]) for b in test] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([b[1] for b in test]), digits.test_labels)


def test_digits_other_size_and_refuses_data_dir(tmp_path):
    ds = load_dataset("digits", image_size=32)
    x, _ = next(iter(ds.test_batches(4)))
    assert x.shape == (4, 3, 32, 32)
    with pytest.raises(DataError, match="embedded"):
        load_dataset("digits", data_dir=tmp_path)


# -- CIFAR ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["py2", 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_real_format(tmp_path, name, style):
    written = write_cifar(tmp_path, name, style)
    lay = CIFAR[name]
    for data_dir in (tmp_path, tmp_path / lay["folder"]):
        ds = load_dataset(name, data_dir=str(data_dir))
        assert ds.num_classes == lay["classes"] and ds.class_names[3] == "class_3"
        data = np.concatenate([written[f][0] for f in lay["train"]])
        labels = [v for f in lay["train"] for v in written[f][1]]
        assert torch.equal(ds.train_images, torch.from_numpy(data).view(-1, 3, 32, 32))
        assert ds.train_labels.tolist() == labels
        # test batches come in file order, normalized with the published per-channel constants
        x, y = next(iter(ds.test_batches(1000)))
        raw = torch.from_numpy(written[lay["test"][0]][0]).view(-1, 3, 32, 32).float() / 255
        mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
        torch.testing.assert_close(x, (raw - mean) / std)
        assert y.tolist() == written[lay["test"][0]][1] and ds.flip


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path, "cifar10", 2)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({"data": _Evil(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2.*system.*refused"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not (tmp_path / "pwned").exists()
    for payload in (pickle.dumps(eval), b"cbuiltins\neval\n(S'1'\ntR.", pickle.dumps(types.SimpleNamespace())):
        bad.write_bytes(payload)
        with pytest.raises(DataError, match="refused"):
            load_plain_pickle(bad)


def test_cifar_errors_name_the_file(tmp_path):
    write_cifar(tmp_path, "cifar10", 2)
    folder = tmp_path / "cifar-10-batches-py"
    good = (folder / "test_batch").read_bytes()

    def expect(match):
        with pytest.raises(DataError, match=match):
            load_dataset("cifar10", data_dir=tmp_path)

    (folder / "test_batch").write_bytes(good[: len(good) // 2])
    expect(r"test_batch is truncated")
    (folder / "test_batch").write_bytes(b"\x00not a pickle at all")
    expect(r"test_batch is not a valid pickle")
    _dump({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 10, 2]}, folder / "test_batch", 2)
    expect(r"test_batch: labels must lie in \[0, 10\)")
    _dump({"data": np.zeros((3, 1000), np.uint8), "labels": [0, 1, 2]}, folder / "test_batch", 2)
    expect(r"test_batch: 'data' must be an array of shape \(N, 3072\)")
    _dump({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}, folder / "test_batch", 2)
    expect(r"test_batch holds 3 images but 2 labels")
    _dump({"labels": [0]}, folder / "test_batch", 2)
    expect(r"test_batch has no 'data' entry")
    _dump([1, 2], folder / "test_batch", 2)
    expect(r"test_batch should hold a dict")
    _dump({"label_names": ["a", "b"]}, folder / "batches.meta", 2)
    expect(r"batches.meta should list 10 class names")
    (folder / "data_batch_3").unlink()
    expect(r"cifar-10-batches-py is missing data_batch_3")
    with pytest.raises(DataError, match=r"holds no cifar-100-python"):
        load_dataset("cifar100", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"needs a data directory"):
        load_dataset("cifar100")


def test_unknown_name_and_bad_size():
    with pytest.raises(DataError, match=r"unknown dataset 'svhn'.*digits, cifar10, cifar100, folder, mnist"):
        load_dataset("svhn")
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", image_size=0)
    assert DATASETS == ("digits", "cifar10", "cifar100", "folder", "mnist", "fashion-mnist") and issubclass(DataError, ValueError)


# -- image folders ----------------------------------------------------------------------------------------------------
def test_image_folder_with_pngs(tmp_path):
    pytest.importorskip("PIL")
    colors = write_folder(tmp_path)
    ds = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert ds.class_names == ("cat", "dog", "emu") and ds.num_train == ds.num_test == 9 and ds.flip
    assert ds.train_images.shape == (9, 3, 8, 8) and ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # solid-colour images survive decode + resize + centre crop exactly
    assert ds.test_images[4, :, 3, 5].tolist() == list(colors[("val", "dog", 1)])
    x, _ = next(iter(ds.train_batches(3, 0)))
    assert x.shape == (3, 3, 8, 8)


def test_image_folder_uses_torchvision_when_importable(tmp_path, monkeypatch):
    from PIL import Image

    write_folder(tmp_path, per_class=1)
    calls = []

    def decode_image(data, mode):  # the torchvision.io contract: encoded bytes -> uint8 (3, H, W)
        calls.append(mode)
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")).copy()
                                ).permute(2, 0, 1)

    fake_io = types.SimpleNamespace(
        read_file=lambda p: torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8),
        decode_image=decode_image, ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=fake_io))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake_io)
    ds = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert calls == ["RGB"] * 6
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # now not importable: Pillow alone
    assert torch.equal(load_dataset("folder", data_dir=tmp_path, image_size=8).train_images, ds.train_images)


def test_image_folder_errors(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    write_folder(tmp_path)
    for f in (tmp_path / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*dog holds no images"):
        load_dataset("folder", data_dir=tmp_path)
    (tmp_path / "train" / "dog").rmdir()
    with pytest.raises(DataError, match=r"val has class folders that .*train lacks: dog"):
        load_dataset("folder", data_dir=tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"image .*0.png could not be read"):
        load_dataset("folder", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"must hold train/ and val/"):
        load_dataset("folder", data_dir=tmp_path / "train")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"pip install 'repopt\[vision\]'"):
        load_dataset("folder", data_dir=tmp_path)


# -- batching ---------------------------------------------------------------------------------------------------------
def test_batches_are_deterministic_per_seed_and_epoch():
    ds = small_dataset()
    a, b = _epoch(ds, 8, 3, seed=7), _epoch(ds, 8, 3, seed=7)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], _epoch(ds, 8, 4, seed=7)[0][0])
    assert not torch.equal(a[0][0], _epoch(ds, 8, 3, seed=8)[0][0])
    assert len(a) == ds.steps_per_epoch(8) == 37 // 8
    assert sorted(torch.cat([y for _, y in _epoch(ds, 37, 0)]).tolist()) == sorted(ds.train_labels.tolist())


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_slices_concatenate_to_the_global_batch(world_size, drop_last):
    ds = small_dataset(n_train=41)
    single = _epoch(ds, 4 * world_size, 5, seed=1, drop_last=drop_last)
    ranks = [_epoch(ds, 4, 5, seed=1, rank=r, world_size=world_size, drop_last=drop_last) for r in range(world_size)]
    steps = ds.steps_per_epoch(4, world_size, drop_last)
    assert all(len(r) == steps for r in ranks)
    # a tail smaller than world_size would leave a rank empty, so ranks drop it while one process keeps it
    assert len(single) == steps + (not drop_last and 0 < 41 % (4 * world_size) < world_size)
    for i, (x, y) in enumerate(single[:steps]):
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), x)
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)


def test_augmentation_is_a_crop_or_a_flip_of_the_original():
    ds = small_dataset(n_train=16, n_test=1, crop_padding=0)
    x_aug, _ = next(iter(ds.train_batches(16, 0, seed=3)))
    x_raw, _ = next(iter(ds.train_batches(16, 0, seed=3, augment=False)))
    flipped = [torch.equal(a, r.flip(-1)) and not torch.equal(a, r) for a, r in zip(x_aug, x_raw)]
    assert all(torch.equal(a, r) or f for a, r, f in zip(x_aug, x_raw, flipped)) and 0 < sum(flipped) < 16
    ds = small_dataset(n_train=16, n_test=1, flip=False, crop_padding=2)
    x_aug, _ = next(iter(ds.train_batches(16, 0, seed=3)))
    x_raw, _ = next(iter(ds.train_batches(16, 0, seed=3, augment=False)))
    black = (0 - torch.tensor(ds.mean)) / torch.tensor(ds.std)
    padded = black.view(1, 3, 1, 1).expand(16, 3, 12, 12).clone()
    padded[:, :, 2:10, 2:10] = x_raw
    windows = padded.unfold(2, 8, 1).unfold(3, 8, 1)  # (B, C, 5, 5, 8, 8): every possible crop
    for k in range(16):
        assert any(torch.allclose(windows[k, :, i, j], x_aug[k]) for i in range(5) for j in range(5))


def test_calibration_batches_and_validation():
    ds = small_dataset()
    cal = ds.calibration_batches(3, 5)
    assert len(cal) == 3 and all(x.shape == (5, 3, 8, 8) for x, _ in cal)
    assert len(ds.calibration_batches(100, 10)) == 4  # 37 images: three full batches and a tail of 7
    assert ds._on_device("cpu") is ds._on_device(torch.device("cpu"))  # moved once, cached
    with pytest.raises(DataError, match="larger than the 37 training images"):
        ds.train_batches(20, 0, world_size=2)
    with pytest.raises(DataError, match="rank"):
        ds.train_batches(2, 0, rank=2, world_size=2)
    with pytest.raises(DataError, match="uint8"):
        Dataset("bad", torch.zeros(2, 3, 4, 4), torch.zeros(2), torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                torch.zeros(1), ["a"])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        Dataset("bad", torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]),
                torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1), ["a", "b"])
