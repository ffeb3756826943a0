"""ONNX export of the deployed network, checked against PyTorch with onnxruntime (the `export` extra)."""
from __future__ import annotations

import sys

import pytest
import torch

from nets import conv_bn_net
from repopt.quant import ExportDependencyError, check_onnx, export_onnx

REASON = "ONNX export needs the `export` extra: pip install 'repopt[export]'"


def test_export_parity(tmp_path):
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=REASON)
    import onnx

    model, example = conv_bn_net(), torch.randn(4, 3, 16, 16)
    path = export_onnx(model, example, tmp_path / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # written whole, no temp file left
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # the deployed (folded) plain network
    assert check_onnx(path, model, example) < 1e-4
    assert check_onnx(path, model, torch.randn(7, 3, 16, 16)) < 1e-4  # dynamic batch
    path1 = export_onnx(model, example[:1], tmp_path / "b1.onnx")  # a batch-1 example must not fix the batch
    assert check_onnx(path1, model, torch.randn(3, 3, 16, 16)) < 1e-4


def test_export_without_onnx(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ExportDependencyError, match=r"pip install 'repopt\[export\]'"):
        export_onnx(conv_bn_net(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
