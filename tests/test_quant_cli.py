"""`repopt quantize`, `repopt analyze` and `repopt export` on tiny trained runs (one epoch on the embedded digits)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from repopt.app.cli import main
from repopt.app.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="INT8 needs the `quant` extra: pip install 'repopt[quant]'")
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs the `export` extra: "
                                                     "pip install 'repopt[export]'")


def _train(out, method, **kw):
    cfg = TrainConfig(method=method, arch="repopt_vgg_tiny", dataset="digits", image_size=16, epochs=1,
                      batch_size=128, quiet=True, out=str(out), **kw)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("qruns")
    hs = _train(root / "hs", "hs", grad_clip=5.0)
    # no separate plain run: once deployed it is the same network as repopt's, and each training costs seconds
    return {"repopt": _train(root / "repopt", "repopt", scales=str(hs / "scales.safetensors")),
            "repvgg": _train(root / "repvgg", "repvgg")}


def cli_json(capsys, *argv) -> dict:
    assert main([*map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def cli_error(capsys, *argv) -> str:
    assert main(list(map(str, argv))) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- quantize

@needs_torchao
def test_quantize_qat_json(runs, capsys):
    out = cli_json(capsys, "quantize", runs["repopt"], "--calib-batches", 2, "--repeats", 3, "--qat-epochs", 1,
                   "--threads", 1, "--batch-size", 128)
    for key in ("fp32_top1", "int8_top1", "qat_int8_top1", "fp32_ms_per_batch", "int8_ms_per_batch",
                "int8_logit_sqnr_db", "qat_int8_logit_sqnr_db", "int8_agreement"):
        assert isinstance(out[key], float) and out[key] >= 0
    assert out["int8_logit_sqnr_db"] > 10  # int8 is a small perturbation of the logits, not noise
    s = out["settings"]
    assert s["per_channel"] is True and s["calib_batches"] == 2 and s["images_seen"] == 256
    assert s["activation_observer"] == "histogram" and isinstance(s["reduce_range"], bool)
    assert sum(s["int8_ops"].values()) > 0  # really lowered to oneDNN int8 kernels
    assert out["qat_settings"]["is_qat"] is True and out["qat_settings"]["qat_epochs"] == 1
    assert out["timing"]["batch_size"] == 128 and out["method"] == "repopt"
    assert out["timing"]["int8_min_ms"] <= out["int8_ms_per_batch"]


@needs_torchao
def test_quantize_text_per_tensor(runs, capsys):
    assert main(["quantize", str(runs["repvgg"]), "--calib-batches", "1", "--repeats", "2", "--per-tensor",
                 "--observer", "minmax", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "int8 PTQ" in text and "ms/batch" in text and "QAT" not in text and "torch threads 1" in text
    assert "logit SQNR" in text
    assert "per-tensor weights, minmax observer" in text and "64 calibration images" in text


def test_quantize_refusals(runs, tmp_path, capsys):
    assert "no such checkpoint file or run directory" in cli_error(capsys, "quantize", tmp_path / "nope")
    assert "--calib-batches must be at least 1" in cli_error(capsys, "quantize", runs["repopt"], "--calib-batches",
                                                             0)
    # cifar10 without its files: the dataset error, in one line
    err = cli_error(capsys, "quantize", runs["repopt"], "--dataset", "cifar10", "--data-dir", tmp_path)
    assert err.startswith("repopt quantize: error:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown dataset name
        main(["quantize", str(runs["repopt"]), "--dataset", "svhn"])
    assert e.value.code == 2 and "invalid choice: 'svhn'" in capsys.readouterr().err


def test_quantize_without_torchao(runs, capsys, without_torchao):
    err = cli_error(capsys, "quantize", runs["repopt"], "--calib-batches", 1)
    assert "pip install 'repopt[quant]'" in err and err.count("\n") == 1


# ---------------------------------------------------------------- analyze

def test_analyze_two_runs(runs, tmp_path, capsys):
    png = tmp_path / "kernels.png"
    argv = ["analyze", runs["repopt"], runs["repvgg"]] + (["--plot", png] if HAS_MPL else [])
    out = cli_json(capsys, *argv)
    assert [r["label"] for r in out["runs"]] == ["repopt", "repvgg"]
    for r in out["runs"]:
        assert r["layers"] and {"std", "std_centre", "std_surround", "max_abs"} <= set(r["layers"][0])
        assert r["summary"]["layers"] == len(r["layers"]) and r["summary"]["centre_over_surround"] > 0
    # same architecture once deployed: both plain networks have the same 3x3 convs
    names = [[row["name"] for row in r["layers"]] for r in out["runs"]]
    assert names[0] == names[1]
    if HAS_MPL:
        assert png.read_bytes()[:4] == b"\x89PNG" and out["plot"] == str(png)
    assert main(["analyze", str(runs["repvgg"]), str(runs["repvgg"])]) == 0  # same method twice: paths tell apart
    text = capsys.readouterr().out
    assert "summary" in text and f"repvgg ({runs['repvgg']})" in text


def test_analyze_refusals(runs, tmp_path, capsys):
    assert "no such checkpoint" in cli_error(capsys, "analyze", runs["repopt"], tmp_path / "missing")
    assert "no KxK conv named 'nope'" in cli_error(capsys, "analyze", runs["repopt"], "--layer", "nope")


# ---------------------------------------------------------------- export

@needs_onnx
def test_export_check(runs, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    out = cli_json(capsys, "export", runs["repvgg"], "-o", path, "--check")
    assert path.is_file() and out["bytes"] == path.stat().st_size
    assert out["check_ok"] is True and out["max_abs_diff"] < 1e-4 and out["input_shape"] == ["N", 3, 16, 16]
    assert main(["export", str(runs["repopt"]), "-o", str(path), "--check"]) == 0
    assert "max abs diff" in capsys.readouterr().out


def test_export_refusals(runs, tmp_path, capsys, monkeypatch):
    assert "cannot be written" in cli_error(capsys, "export", runs["repopt"], "-o", tmp_path / "no" / "m.onnx")
    assert "no such checkpoint" in cli_error(capsys, "export", tmp_path / "x", "-o", tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = cli_error(capsys, "export", runs["repopt"], "-o", tmp_path / "m.onnx", "--check")
    assert "pip install 'repopt[export]'" in err and not (tmp_path / "m.onnx").exists()


def test_compare_on_test_measures_the_gap():
    import torch

    from repopt.app.commands.quantize import compare_on_test

    torch.manual_seed(0)
    fp32 = torch.nn.Linear(4, 3)
    noisy = torch.nn.Linear(4, 3)
    noisy.load_state_dict({k: v + 0.1 * v.abs().mean() for k, v in fp32.state_dict().items()})
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    out = compare_on_test(fp32, {"same": fp32, "noisy": noisy}, batches)
    assert out["same_agreement"] == 100.0 and out["same_logit_sqnr_db"] == float("inf")
    assert out["same_top1"] == out["fp32_top1"]
    assert 0 < out["noisy_logit_sqnr_db"] < 60
