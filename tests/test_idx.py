"""MNIST / Fashion-MNIST from IDX files the tests write (flat, gzipped or not, torchvision's raw/ layout), the bad files
(one sentence naming the file), the fixed training subset, and the datasets through every command."""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

from formats import IDX_FILES, idx_bytes, write_idx_dataset
from repopt.app.cli import main
from repopt.data import DataError, load_dataset
from repopt.data import idx as idx_module
from repopt.data.idx import read_idx

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


# -- the format -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(a)
    path = tmp_path / "a-idx3-ubyte"  # gzip is recognized by its magic bytes, whatever the name says
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, a)
    w = np.array([[-2, 300]], dtype=np.int16)  # other IDX types are big-endian too
    (tmp_path / "w").write_bytes(idx_bytes(w, 0x0B))
    assert read_idx(tmp_path / "w").tolist() == [[-2, 300]]


def _one_sentence(excinfo, *parts):
    msg = str(excinfo.value)
    assert msg.count("\n") == 0 and all(p in msg for p in parts), msg


@pytest.mark.parametrize("content, message", [
    (b"\x08\x03\x00\x00" + bytes(20), "is not an IDX file"),             # wrong magic (no leading zeros)
    (b"\x00\x00\x07\x01" + bytes(8), "is not an IDX file"),              # unknown type code
    (b"\x00\x00\x08\x03\x00\x00", "is truncated"),                       # header cut short
    (idx_bytes(np.zeros((4, 5, 5), np.uint8))[:-7], "is truncated"),     # data cut short
    (idx_bytes(np.zeros((4, 5, 5), np.uint8)) + b"\x00", "longer than its header says"),
    (gzip.compress(idx_bytes(np.zeros((4, 5, 5), np.uint8)))[:-10], "truncated or damaged gzip"),
    (b"", "is not an IDX file"),
])
def test_bad_idx_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_idx(path)
    _one_sentence(e, str(path), message)


# -- layouts ----------------------------------------------------------------------------------------------------------
def test_fashion_mnist_flat_gz_and_torchvision_layouts(tmp_path):
    written = write_idx_dataset(tmp_path / "flat", gz=True)
    write_idx_dataset(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    write_idx_dataset(tmp_path / "tv" / "MNIST" / "raw", gz=False, seed=1)
    flat = load_dataset("fashion-mnist", data_dir=tmp_path / "flat")
    assert (flat.num_train, flat.num_test, flat.image_size, flat.num_classes) == (40, 20, 10, 10)
    assert flat.class_names[0] == "T-shirt/top" and flat.class_names[9] == "Ankle boot"
    assert flat.flip and flat.crop_padding == 1  # mirrored garments are the same garments
    assert torch.equal(flat.train_images[:, 0], torch.from_numpy(written["train"][0]))
    assert flat.test_labels.tolist() == written["test"][1].tolist()
    for data_dir in (tmp_path / "tv", tmp_path / "tv" / "FashionMNIST", tmp_path / "tv" / "FashionMNIST" / "raw"):
        ds = load_dataset("fashion-mnist", data_dir=data_dir)
        assert torch.equal(ds.train_images, flat.train_images)  # the same files, ungzipped
    mnist = load_dataset("mnist", data_dir=tmp_path / "tv", image_size=16)
    assert not mnist.flip and mnist.class_names == tuple("0123456789")  # mirrored digits are other glyphs
    assert next(iter(mnist.test_batches(4)))[0].shape == (4, 3, 16, 16)
    assert not torch.equal(mnist.train_images, flat.train_images)  # MNIST/raw, not FashionMNIST/raw


def test_default_folder_and_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    _one_sentence(e, str(tmp_path / "absent"), "apt-get install -y dataset-fashion-mnist", "--data-dir")
    write_idx_dataset(tmp_path / "absent")
    assert load_dataset("fashion-mnist").num_train == 40
    with pytest.raises(DataError) as e:
        load_dataset("mnist")
    _one_sentence(e, "mnist needs --data-dir", "MNIST/raw")


def _replace(folder, name, content):
    for p in folder.glob(f"{name}*"):
        p.unlink()
    (folder / name).write_bytes(content)


@pytest.mark.parametrize("file, content, message", [
    (IDX_FILES["train"][1], idx_bytes(np.zeros(39, np.uint8)), "holds 39 labels but train-images-idx3-ubyte"),
    (IDX_FILES["test"][0], idx_bytes(np.zeros((20, 10, 12), np.uint8)), "should hold uint8 images of shape (N, S, S)"),
    (IDX_FILES["test"][1], idx_bytes(np.zeros((20, 2), np.uint8)), "one uint8 label per image"),
    (IDX_FILES["train"][1], idx_bytes(np.full(40, 10, np.uint8)), "labels must lie in [0, 10)"),
    (IDX_FILES["train"][0], b"\x00\x00\x08\x03" + bytes(8), "is truncated"),
])
def test_bad_dataset_files_are_named(tmp_path, file, content, message):
    write_idx_dataset(tmp_path, gz=False)
    _replace(tmp_path, file, content)
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    _one_sentence(e, file, message)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    _one_sentence(e, str(tmp_path), "holds no mnist IDX files", "MNIST/raw/")
    write_idx_dataset(tmp_path)
    (tmp_path / f"{IDX_FILES['test'][1]}.gz").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    _one_sentence(e, "holds only part of mnist", "t10k-labels-idx1-ubyte (or .gz) is missing")
    with pytest.raises(DataError) as e:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    _one_sentence(e, "does not exist")


# -- the training subset ----------------------------------------------------------------------------------------------
def test_train_subset_is_fixed_balanced_and_keeps_the_test_split(tmp_path):
    write_idx_dataset(tmp_path, n_train=200)
    whole = load_dataset("fashion-mnist", data_dir=tmp_path)
    a = load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=53)
    b = load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=53)
    assert a.num_train == 53 and torch.equal(a.train_images, b.train_images)
    counts = torch.bincount(a.train_labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # as equal per class as 53 allows
    assert a.mean == whole.mean and a.std == whole.std and torch.equal(a.test_images, whole.test_images)
    # every subset image is a training image with its own label
    pairs = {(bytes(x.numpy()), int(y)) for x, y in zip(whole.train_images[:, 0], whole.train_labels)}
    assert all((bytes(x.numpy()), int(y)) in pairs for x, y in zip(a.train_images[:, 0], a.train_labels))
    assert load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=200).num_train == 200
    with pytest.raises(DataError, match="only 200 training images"):
        load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=201)
    with pytest.raises(DataError, match="positive number"):
        load_dataset("fashion-mnist", data_dir=tmp_path, train_subset=0)


def test_train_subset_of_a_streamed_folder_is_refused(tmp_path):
    from formats import write_jpeg_folder

    write_jpeg_folder(tmp_path, per_class=2, val_per_class=1)
    with pytest.raises(DataError) as e:  # its images are files decoded per epoch, not tensors to pick from
        load_dataset("folder", tmp_path, 16, loader="stream", workers=0, train_subset=3)
    _one_sentence(e, str(tmp_path), "streamed from disk", "--loader memory")
    assert load_dataset("folder", tmp_path, 16, loader="memory", train_subset=3).num_train == 3


# -- through every command --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fmnist")
    write_idx_dataset(root / "data" / "FashionMNIST" / "raw", n_train=48, n_test=16)
    out = root / "pipe"
    assert main(PIPELINE + ["--data-dir", str(root / "data"), "--out", str(out)]) == 0
    return root, out


# 10 px files served at their stored size, a training subset of 32 of the 48 images
PIPELINE = ["pipeline", "--arch", "repopt_vgg_tiny", "--dataset", "fashion-mnist", "--epochs", "1", "--hs-epochs", "1",
            "--batch-size", "16", "--train-subset", "32", "--no-int8", "--quiet"]


def test_pipeline_train_search_eval_on_fashion_mnist(fmnist_run, capsys):
    root, out = fmnist_run
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "fashion-mnist" and report["train_subset"] == 32 and report["image_size"] == 10
    assert [r["method"] for r in report["results"]] == ["repopt", "repvgg", "plain"]
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    # the same command again skips every finished stage (the size recorded is the files' 10, not the default 28)
    assert main(PIPELINE + ["--data-dir", str(root / "data"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert len(finished) == 4 and finished == {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    capsys.readouterr()
    assert main(["eval", str(out / "repopt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "fashion-mnist"
    assert main(["search", "--dataset", "fashion-mnist", "--data-dir", str(root / "data"), "--epochs", "1",
                 "--batch-size", "16", "--quiet", "--out", str(root / "search")]) == 0
    assert (root / "search" / "scales.safetensors").is_file()
    assert main(["train", "--method", "repopt", "--scales", str(root / "search" / "scales.safetensors"),
                 "--dataset", "mnist", "--data-dir", str(root / "data" / "FashionMNIST" / "raw"), "--epochs", "1",
                 "--batch-size", "16", "--quiet", "--out", str(root / "mnist")]) == 0


def test_analyze_quantize_export_on_fashion_mnist(fmnist_run, capsys, tmp_path):
    _, out = fmnist_run
    assert main(["analyze", str(out / "repopt"), str(out / "repvgg"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 2
    if HAS_TORCHAO:
        assert main(["quantize", str(out / "repopt"), "--calib-batches", "1", "--repeats", "1", "--threads", "1",
                     "--per-tensor", "--batch-size", "16", "--json"]) == 0
        q = json.loads(capsys.readouterr().out)
        assert q["settings"]["per_channel"] is False and 0 <= q["int8_top1"] <= 100
    if HAS_ONNX:
        assert main(["export", str(out / "plain"), "-o", str(tmp_path / "m.onnx")]) == 0
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "m.onnx"), "--json"]) == 0
        onnx_eval = json.loads(capsys.readouterr().out)
        assert main(["eval", str(out / "plain"), "--deploy", "--json"]) == 0
        run_eval = json.loads(capsys.readouterr().out)
        assert onnx_eval["dataset"] == "fashion-mnist" and onnx_eval["top1"] == pytest.approx(run_eval["top1"])
        # INT8: calibrated on the run's own training subset (32 images), not the whole 48-image split
        assert main(["export", str(out / "plain"), "--int8", "-o", str(tmp_path / "q.onnx"), "--calib-batches", "8",
                     "--batch-size", "16", "--repeats", "1", "--json"]) == 0
        q = json.loads(capsys.readouterr().out)
        assert q["calibration"]["images"] == 32 and q["test"]["dataset"] == "fashion-mnist"


def test_calibration_reads_the_runs_training_subset(fmnist_run):
    from repopt.app.checkpoint import run_data_options
    from repopt.app.commands.quantize import dataset_for

    _, out = fmnist_run
    cfg = json.loads((out / "plain" / "result.json").read_text())["config"]
    assert run_data_options(cfg) == {"train_subset": 32}
    ds = dataset_for(argparse.Namespace(dataset=None, data_dir=None), cfg)  # quantize, export --int8, pipeline
    assert ds.num_train == 32 and ds.num_test == 16
    # another dataset named on the command line is not the run's: none of the run's options
    other = dataset_for(argparse.Namespace(dataset="mnist", data_dir=f"{cfg['data_dir']}/FashionMNIST/raw"), cfg)
    assert other.num_train == 48


def test_commands_name_a_bad_idx_file(tmp_path, capsys):
    write_idx_dataset(tmp_path, gz=False)
    _replace(tmp_path, IDX_FILES["train"][1], idx_bytes(np.zeros(7, np.uint8)))
    code = main(["train", "--method", "plain", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                 "--epochs", "1", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train-labels-idx1-ubyte holds 7 labels" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "result.json").exists()
