"""INT8 ONNX through onnxruntime's static quantization, and the PT2E program saved before lowering and lowered again
in another process (the library side; the commands are in test_deploy_cli.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from nets import conv_bn_net
from repopt.quant import (CLASSIFIER_FORMAT, FORMAT_KEY, InputShapeError, OnnxFileError, OnnxModel,
                          OnnxQuantSettings, ProgramFileError, QuantSettings, export_onnx, load_int8_program,
                          quantize_onnx, quantize_ptq, read_program_info, save_int8_program)

REASON = "INT8 ONNX needs the `export` extra: pip install 'repopt[export]'"


@pytest.fixture(scope="module")
def onnx_modules():
    return [pytest.importorskip(m, reason=REASON) for m in ("onnx", "onnxscript", "onnxruntime")]


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 12, 12, generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def fp32_file(onnx_modules, tmp_path_factory, calib):
    path = tmp_path_factory.mktemp("onnx") / "fp32.onnx"
    export_onnx(conv_bn_net(trained_bn_affine=False), calib[0], path, metadata={FORMAT_KEY: CLASSIFIER_FORMAT, "repopt.precision": "fp32"})
    return path


def weight_scales(path) -> list[int]:
    """Number of scales of each weight DequantizeLinear (initializer input) of a QDQ file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]].size for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_onnx_qdq(fp32_file, calib, tmp_path, per_channel):
    out = tmp_path / "int8.onnx"
    report = quantize_onnx(fp32_file, out, calib, OnnxQuantSettings(per_channel=per_channel, calib_batches=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # no temporary left beside it
    assert report["images_seen"] == 32 and report["per_channel"] is per_channel and report["quant_format"] == "QDQ"
    assert report["ops"]["QuantizeLinear"] > 0 and report["ops"]["DequantizeLinear"] > 0
    scales = weight_scales(out)
    assert scales == ([8, 16] if per_channel else [1, 1])  # one scale per output channel, or one per tensor
    q, f = OnnxModel(out), OnnxModel(fp32_file)
    assert q.metadata[FORMAT_KEY] == CLASSIFIER_FORMAT  # the fp32 file's metadata survives quantization
    x = torch.randn(7, 3, 12, 12, generator=torch.Generator().manual_seed(2))  # dynamic batch
    ref, got = f(x), q(x)
    assert torch.allclose(ref, conv_bn_net(trained_bn_affine=False)(x).detach(), atol=1e-4)
    assert 0 < ((got - ref).norm() / ref.norm()).item() < 0.1  # quantized: close, not equal


def test_quantize_onnx_refuses_bad_calibration(fp32_file, calib, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(InputShapeError, match=r"calibration batch 0 has shape \(16, 1, 12, 12\) \(1 channel\)"):
        quantize_onnx(fp32_file, out, [c[:, :1] for c in calib])
    with pytest.raises(InputShapeError, match=r"calibration batch 1 has shape \(4, 3, 16, 16\)"):
        quantize_onnx(fp32_file, out, [calib[0], torch.randn(4, 3, 16, 16)])  # found while calibrating
    with pytest.raises(InputShapeError, match="at least one batch"):
        quantize_onnx(fp32_file, out, [])
    out.write_text("old")
    with pytest.raises(InputShapeError):
        quantize_onnx(fp32_file, out, [calib[0][0]])  # 3-D: a single image, not a batch
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]


def test_onnx_model_refuses_foreign_files(fp32_file, tmp_path):
    import onnx

    model = onnx.load(str(fp32_file))
    del model.metadata_props[:]  # the same network, without repopt's metadata
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(OnnxFileError, match="not an ONNX classifier written by repopt"):
        OnnxModel(foreign)
    assert OnnxModel(foreign, check_classifier=False)(torch.randn(1, 3, 12, 12)).shape == (1, 10)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(OnnxFileError, match="not an ONNX model onnxruntime can load"):
        OnnxModel(junk)
    with pytest.raises(InputShapeError, match="4 channels"):
        OnnxModel(foreign, check_classifier=False)(torch.randn(1, 4, 12, 12))


def test_settings_validation():
    with pytest.raises(ValueError, match="calibrate_method"):
        OnnxQuantSettings(calibrate_method="kl")
    with pytest.raises(ValueError, match="calib_batches"):
        OnnxQuantSettings(calib_batches=0)
    d = OnnxQuantSettings(reduce_range=True).to_dict()
    assert d["reduce_range"] is True and d["weight_quantization"].startswith("int8 symmetric")


# ---------------------------------------------------------------- the PT2E program (torchao)

@pytest.fixture(scope="module")
def program(tmp_path_factory, calib):
    pytest.importorskip("torchao", reason="INT8 tests need the `quant` extra: pip install 'repopt[quant]'")
    int8 = quantize_ptq(conv_bn_net(trained_bn_affine=False), calib, QuantSettings(calib_batches=3))
    path = tmp_path_factory.mktemp("pt2") / "q.pt2"
    save_int8_program(int8, path, {"config": {"arch": "test"}})
    return int8, path


LOAD_ELSEWHERE = """
import sys, torch
from repopt.quant import load_int8_program
x, ref = torch.load(sys.argv[2], weights_only=True)
q, info = load_int8_program(sys.argv[1])
out = q(x)
print(info["config"]["arch"], q.batch_size, sum(q.quantized_ops().values()), float((out - ref).abs().max()))
"""


def test_program_reloads_and_lowers_in_another_process(program, tmp_path):
    int8, path = program
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save((x, int8(x)), tmp_path / "ref.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(path), str(tmp_path / "ref.pt")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    arch, batch, kernels, diff = done.stdout.split()
    assert arch == "test" and int(batch) == 16 and int(kernels) == 3  # lowered again to 2 qconv + 1 qlinear
    assert float(diff) < 1e-4  # the same int8 arithmetic as the model that was saved
    assert read_program_info(path)["settings"]["per_channel"] is True


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


def test_program_refusals(program, tmp_path):
    _, path = program

    def pickled(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    _rewrite(path, tmp_path / "pickled.pt2", pickled)
    with pytest.raises(ProgramFileError, match="would have to be unpickled"):
        load_int8_program(tmp_path / "pickled.pt2")
    _rewrite(path, tmp_path / "foreign.pt2", lambda n, d: b"{}" if n.endswith("extra/repopt.json") else d)
    with pytest.raises(ProgramFileError, match="not an INT8 program written by repopt"):
        load_int8_program(tmp_path / "foreign.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ProgramFileError, match="not a torch.export archive"):
        load_int8_program(tmp_path / "junk.pt2")
