"""ONNX export of the deployed plain network (optional `export` extra: onnx, onnxscript; onnxruntime to check)."""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ._extras import MissingExtraError, quiet, require
from .._io import atomic_write
from .fold import fold_batchnorm
from .ptq import dynamic_batch


class ExportDependencyError(MissingExtraError):
    """onnx / onnxscript / onnxruntime (the `export` extra) is not installed."""


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike, *, fold: bool = True,
                opset: int | None = None, metadata: dict[str, str] | None = None) -> str:
    """Write `model` (BN folded first on a copy when `fold`; a RepVGG model must already be fused) as ONNX with a
    dynamic batch dimension, input "input" and output "logits", and `metadata` in the model's metadata_props. The
    file appears whole or not at all."""
    for module in ("onnx", "onnxscript"):  # the torch.export-based exporter needs both
        require(module, "export", "ONNX export", ExportDependencyError)
    deployed = (fold_batchnorm(model) if fold else model).eval()
    args, shapes = dynamic_batch(example)
    with quiet("torch.onnx", "torch.utils._pytree"), torch.no_grad():
        program = torch.onnx.export(deployed, args, None, dynamo=True, dynamic_shapes=shapes,
                                    input_names=["input"], output_names=["logits"], opset_version=opset,
                                    external_data=False, verbose=False)
    program.model.metadata_props.update({k: str(v) for k, v in (metadata or {}).items()})
    # weights inside the file: one artefact to ship
    atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
    return os.fspath(path)


@torch.no_grad()
def check_onnx(path: str | os.PathLike, model: nn.Module, example: Tensor) -> float:
    """Largest absolute difference between onnxruntime (CPU) running `path` and `model` (eval mode) on `example`."""
    ort = require("onnxruntime", "export", "Checking an ONNX file", ExportDependencyError)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = torch.from_numpy(session.run(None, {name: example.detach().cpu().float().numpy()})[0])
    want = model.eval()(example).detach().cpu().float()
    if got.shape != want.shape:
        raise ValueError(f"ONNX output shape {tuple(got.shape)} differs from the model's {tuple(want.shape)}")
    return (got - want).abs().max().item()
