"""`repopt export --int8`, `repopt eval FILE.onnx|FILE.pt2`, `repopt quantize --save` and the pipeline's onnxruntime
INT8 column, on one tiny trained run (one epoch on the embedded digits)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import shutil
import sys

import pytest

from repopt.app.cli import main
from repopt.app.train import TrainConfig, train

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
pytestmark = pytest.mark.skipif(not HAS_ONNX, reason="INT8 ONNX needs the `export` extra: "
                                                     "pip install 'repopt[export]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("deploy") / "plain"
    train(TrainConfig(method="plain", arch="repopt_vgg_tiny", dataset="digits", image_size=16, epochs=1,
                      batch_size=128, quiet=True, out=str(out)))
    return out


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_json(capsys, *argv) -> dict:
    code, out, err = cli(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def int8_export(run, tmp_path_factory):
    """(the INT8 file, what the command printed): one export shared by the tests below (each takes seconds)."""
    path = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["export", str(run), "--int8", "-o", str(path), "--calib-batches", "2", "--repeats", "2",
                     "--per-tensor", "--batch-size", "32"]) == 0
    return path, text.getvalue()


@pytest.fixture(scope="module")
def int8_file(int8_export):
    return int8_export[0]


def test_export_int8_writes_a_checked_file(int8_file, run):
    import onnx

    info = json.loads((int8_file.parent / "model.int8.onnx.json").read_text())
    assert sorted(p.name for p in int8_file.parent.iterdir()) == ["model.int8.onnx", "model.int8.onnx.json"]
    assert info["sha256"] == hashlib.sha256(int8_file.read_bytes()).hexdigest()
    s = info["settings"]
    assert s["per_channel"] is False and s["calib_batches"] == 2 and s["quant_format"] == "QDQ"
    assert info["calibration"]["images"] == 64 and info["calibration"]["dataset"] == "digits"
    t = info["test"]
    assert t["images"] == 360 and t["backend"] == "onnxruntime"
    assert t["int8_agreement"] > 90 and t["int8_logit_sqnr_db"] > 10  # a small perturbation of fp32, not noise
    assert abs(t["int8_top1"] - t["fp32_top1"]) < 5
    lat = info["latency"]
    assert {lat["batch_1"]["batch"], lat["batch_32"]["batch"]} == {1, 32} and lat["threads"] == 1
    assert lat["batch_32"]["int8_over_fp32"] > 0 and "--per-tensor" in info["command"]
    model = onnx.load(str(int8_file))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["repopt.format"] == "repopt-classifier" and meta["repopt.precision"] == "int8"
    assert json.loads(meta["repopt.config"])["method"] == "plain"
    assert json.loads(meta["repopt.input"])["shape"] == ["N", 3, 16, 16]
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "BatchNormalization" not in ops


def test_export_int8_text(int8_export):
    out = int8_export[1]
    assert "per-tensor int8 weights" in out and "minmax ranges from 64 digits training images" in out
    assert "INT8 top-1" in out and "batch   1:" in out and "batch  32:" in out and "1 thread" in out


def test_eval_int8_file_matches_the_export_check(int8_file, capsys):
    info = json.loads((int8_file.parent / "model.int8.onnx.json").read_text())
    out = cli_json(capsys, "eval", int8_file)
    assert out["precision"] == "int8" and out["backend"] == "onnxruntime" and out["dataset"] == "digits"
    assert out["method"] == "plain" and out["top1"] == pytest.approx(info["test"]["int8_top1"])


def test_eval_fp32_file_matches_the_run(run, tmp_path, capsys):
    import onnx

    path = tmp_path / "m.onnx"
    assert main(["export", str(run), "-o", str(path)]) == 0
    capsys.readouterr()
    from_file = cli_json(capsys, "eval", path, "--batch-size", 100)
    from_run = cli_json(capsys, "eval", run, "--deploy")
    assert from_file["precision"] == "fp32" and from_file["top1"] == pytest.approx(from_run["top1"])
    assert from_file["loss"] == pytest.approx(from_run["loss"], rel=1e-4)
    # the same network without the metadata repopt writes: not recognised as one of ours
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    code, _, err = cli(capsys, "eval", path)
    assert code == 2 and "not an ONNX classifier written by repopt" in err and err.count("\n") == 1


def test_refusals(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.onnx"
    # a run directory without a finished model (training stopped after a checkpoint)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "model.safetensors").unlink()
    code, _, err = cli(capsys, "export", unfinished, "--int8", "-o", out)
    assert code == 2 and "holds no finished model" in err and err.count("\n") == 1
    # ONNX files that are not classifiers this package wrote
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    code, _, err = cli(capsys, "eval", tmp_path / "junk.onnx")
    assert code == 2 and "not an ONNX model onnxruntime can load" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "eval", tmp_path / "none.onnx")
    assert code == 2 and "no such file" in err
    # calibration data of the wrong channel count: refused, the old file kept, no settings written
    out.write_text("old")
    from repopt.data import Dataset

    real = Dataset.calibration_batches
    monkeypatch.setattr(Dataset, "calibration_batches",
                        lambda self, *a, **k: [(x[:, :1], y) for x, y in real(self, *a, **k)])
    code, _, err = cli(capsys, "export", run, "--int8", "-o", out, "--calib-batches", 1)
    assert code == 2 and "calibration batch 0 has shape (64, 1, 16, 16) (1 channel)" in err and err.count("\n") == 1
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "m.onnx",
                                                                                      "unfinished"]
    monkeypatch.undo()
    # onnxruntime missing
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = cli(capsys, "export", run, "--int8", "-o", out)
    assert code == 2 and "pip install 'repopt[export]'" in err and err.count("\n") == 1 and out.read_text() == "old"
    code, _, err = cli(capsys, "eval", tmp_path / "junk.onnx")
    assert code == 2 and "pip install 'repopt[export]'" in err


def test_pipeline_int8_column_from_onnxruntime(run):
    from repopt.app.pipeline import INT8_BACKENDS, int8_column, report_markdown

    q = int8_column(run, calib_batches=1, backend="onnxruntime")
    assert (run / "model.int8.onnx").is_file() and (run / "model.int8.onnx.json").is_file()
    assert 0 <= q["int8_top1"] <= 100 and q["int8_settings"]["quant_format"] == "QDQ"
    report = {"arch": "a", "dataset": "d", "epochs": 1, "hs_epochs": 1, "batch_size": 1, "optimizer": "sgd",
              "seed": 0, "hs_top1": 0.0, "int8_backend": INT8_BACKENDS["onnxruntime"],
              "results": [{"method": "plain", "top1": 1.0, "int8_top1": q["int8_top1"], "train_seconds": 1.0,
                           "train_images_per_s": 1.0, "params": 1}]}
    assert "INT8: post-training quantization with onnxruntime QDQ" in report_markdown(report)


@pytest.mark.skipif(not HAS_TORCHAO, reason="INT8 needs the `quant` extra: pip install 'repopt[quant]'")
def test_quantize_save_and_eval_program(run, tmp_path, capsys):
    path = tmp_path / "q.pt2"
    q = cli_json(capsys, "quantize", run, "--calib-batches", 2, "--repeats", 1, "--threads", 1, "--save", path)
    assert q["saved"] == str(path) and path.is_file()
    out = cli_json(capsys, "eval", path)
    assert out["precision"] == "int8" and out["backend"].startswith("torchao") and out["method"] == "plain"
    assert out["top1"] == pytest.approx(q["int8_top1"], abs=0.3)  # reloaded and lowered again: same int8 model
    code, _, err = cli(capsys, "quantize", run, "--save", tmp_path / "q.onnx")
    assert code == 2 and "must end in .pt2" in err
    code, _, err = cli(capsys, "quantize", run, "--save", tmp_path / "no" / "q.pt2")
    assert code == 2 and "cannot be written" in err and err.count("\n") == 1
