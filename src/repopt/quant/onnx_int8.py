"""INT8 ONNX with onnxruntime's quantization tools: static calibration, QDQ format, and a session wrapper to run it.

    fp32 ONNX -> quant_pre_process (shape inference, graph clean-up) -> quantize_static (CalibrationDataReader,
    QuantFormat.QDQ, int8 symmetric weights) -> INT8 ONNX, which onnxruntime runs with QLinearConv / QGemm kernels

Files this package writes carry `metadata_props` (`FORMAT_KEY` = `CLASSIFIER_FORMAT`, precision, training config), so
that a reader can tell them from other ONNX files. onnx and onnxruntime are the optional `export` extra.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from .._io import atomic_write, copy_file
from ._extras import quiet, require
from .export import ExportDependencyError
from .ptq import cpu_has_vnni

FORMAT_KEY = "repopt.format"
CLASSIFIER_FORMAT = "repopt-classifier"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class InputShapeError(ValueError):
    """Batches (calibration or evaluation) that do not fit the model's input."""


class OnnxFileError(ValueError):
    """An ONNX file that cannot be read, or that is not a classifier repopt wrote."""


def _ort(purpose: str):
    return require("onnxruntime", "export", purpose, ExportDependencyError)


@dataclass(frozen=True)
class OnnxQuantSettings:
    """How onnxruntime quantizes. Every field lands in the settings JSON through `to_dict()`.

    per_channel: one weight scale per output channel (True) or one per tensor (False).
    calib_batches: at most this many batches are read from the calibration iterable.
    calibrate_method: how activation ranges are chosen from the calibration data: "minmax" (onnxruntime's default),
        "entropy" or "percentile".
    reduce_range: 7-bit weights (onnxruntime's meaning of the flag). None = auto: True when the CPU lacks VNNI, where
        onnxruntime's u8 x s8 kernels can saturate.
    activations: "uint8" (affine, as torchao's x86 quantizer) or "int8".
    """

    per_channel: bool = True
    calib_batches: int = 32
    calibrate_method: str = "minmax"
    reduce_range: bool | None = None
    activations: str = "uint8"

    def __post_init__(self):
        if self.calibrate_method not in CALIBRATION_METHODS:
            raise ValueError(f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}, "
                             f"not {self.calibrate_method!r}")
        if self.activations not in ("uint8", "int8"):
            raise ValueError(f"activations must be 'uint8' or 'int8', not {self.activations!r}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be at least 1, not {self.calib_batches}")

    def resolved(self) -> "OnnxQuantSettings":
        """A copy with `reduce_range` decided for this CPU."""
        if self.reduce_range is not None:
            return self
        return dataclasses.replace(self, reduce_range=not cpu_has_vnni())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.resolved())
        d.update(quantizer="onnxruntime quantize_static after quant_pre_process", quant_format="QDQ",
                 weight_quantization="int8 symmetric" + (", per output channel" if self.per_channel else
                                                         ", per tensor"),
                 activation_quantization=f"{self.activations} affine per tensor", cpu_vnni=cpu_has_vnni())
        for package in ("onnxruntime", "onnx"):
            try:
                d[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                d[package] = None
        return d


def input_spec(path: str | os.PathLike) -> tuple[str, list]:
    """(name, dims) of the single input of an ONNX model; a dynamic dim is its name (a str) or None."""
    onnx = require("onnx", "export", "Reading an ONNX file", ExportDependencyError)
    model = onnx.load(os.fspath(path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise OnnxFileError(f"{path} has {len(inputs)} inputs; an image classifier has one")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def check_batch(x: Tensor, dims: list, where: str) -> None:
    """Refuse an input batch whose shape does not fit `dims` (the model's input, dynamic dims as str or None)."""
    want = "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in dims) + ")"
    if x.dim() != len(dims):
        raise InputShapeError(f"{where} has shape {tuple(x.shape)}, but the model takes {len(dims)}-D input {want}")
    for axis, (got, need) in enumerate(zip(x.shape, dims)):
        if isinstance(need, int) and need > 0 and got != need:
            what = f"{got} channel{'s' * (got != 1)}" if axis == 1 else f"{got} on axis {axis}"
            raise InputShapeError(f"{where} has shape {tuple(x.shape)} ({what}), but the model takes {want}")


def _as_input(b) -> Tensor:
    x = b[0] if isinstance(b, (tuple, list)) else b
    if not isinstance(x, Tensor):
        raise InputShapeError(f"calibration batches must be tensors or (tensor, label) pairs, got "
                              f"{type(x).__name__}")
    return x


def quantize_onnx(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_batches: Iterable,
                  settings: OnnxQuantSettings | None = None) -> dict:
    """Quantize the fp32 ONNX classifier at `fp32_path` to INT8 QDQ at `out_path` with static calibration.

    `calib_batches` yields input tensors or (input, label) pairs, normalized as the model expects; the first
    `settings.calib_batches` are used, each checked against the model's input shape (a wrong shape or channel count
    raises InputShapeError before anything is written). The metadata of the fp32 file is kept. `out_path`
    appears whole or not at all. Returns what happened: settings, images seen, op counts of the INT8 graph.
    """
    s = (settings or OnnxQuantSettings()).resolved()
    _ort("INT8 ONNX quantization")
    with quiet("onnxruntime", "root"):
        q = require("onnxruntime.quantization", "export", "INT8 ONNX quantization", ExportDependencyError)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    name, dims = input_spec(fp32_path)
    it = iter(calib_batches)
    first = next(it, None)
    if first is None:
        raise InputShapeError("INT8 calibration needs at least one batch, got none")
    check_batch(_as_input(first), dims, "calibration batch 0")
    seen = [0]

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.index = 0

        def get_next(self):
            if self.index >= s.calib_batches:
                return None
            b = first if self.index == 0 else next(it, None)
            if b is None:
                return None
            x = _as_input(b)
            check_batch(x, dims, f"calibration batch {self.index}")
            self.index += 1
            seen[0] += x.shape[0]
            return {name: x.detach().to("cpu", torch.float32).contiguous().numpy()}

    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[s.calibrate_method]
    act = q.QuantType.QUInt8 if s.activations == "uint8" else q.QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="repopt-int8-") as tmp:
        pre, int8 = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        with quiet("onnxruntime", "root", categories=(DeprecationWarning, FutureWarning, UserWarning)):
            quant_pre_process(os.fspath(fp32_path), os.fspath(pre))
            q.quantize_static(os.fspath(pre), os.fspath(int8), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=s.per_channel, reduce_range=s.reduce_range, activation_type=act,
                              weight_type=q.QuantType.QInt8, calibrate_method=method)
        ops = op_counts(int8)
        copy_file(int8, out_path)
    return {**s.to_dict(), "images_seen": seen[0], "ops": ops}


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """{op type: count} of the graph in an ONNX file (QuantizeLinear / DequantizeLinear show the QDQ form)."""
    onnx = require("onnx", "export", "Reading an ONNX file", ExportDependencyError)
    counts: dict[str, int] = {}
    for node in onnx.load(os.fspath(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def set_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Add (or replace) `metadata_props` entries of an ONNX file, rewriting it atomically."""
    onnx = require("onnx", "export", "Writing ONNX metadata", ExportDependencyError)
    model = onnx.load(os.fspath(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    atomic_write(path, lambda tmp: onnx.save(model, os.fspath(tmp)))


class OnnxModel:
    """An ONNX file run by onnxruntime on the CPU, called like a module: logits (torch) = model(images (torch)).

    `threads` sets onnxruntime's intra-op threads (None: its default, one per physical core). `metadata` is the
    file's metadata_props; `check_classifier` (default) refuses files without repopt's format key.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = 1, check_classifier: bool = True):
        ort = _ort("Running an ONNX file")
        self.path = os.fspath(path)
        if not Path(self.path).is_file():
            raise OnnxFileError(f"{self.path}: no such file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: the optimizer's notes say nothing about the user's model
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (pybind) types for unreadable or invalid files
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise OnnxFileError(f"{self.path}: not an ONNX model onnxruntime can load ({reason})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if check_classifier and self.metadata.get(FORMAT_KEY) != CLASSIFIER_FORMAT:
            raise OnnxFileError(f"{self.path}: not an ONNX classifier written by repopt (its metadata has no "
                                f"{FORMAT_KEY}={CLASSIFIER_FORMAT}); export one with `repopt export RUN -o FILE`")
        inp = self.session.get_inputs()
        if len(inp) != 1:
            raise OnnxFileError(f"{self.path} has {len(inp)} inputs; an image classifier has one")
        self.input_name, self.input_dims = inp[0].name, list(inp[0].shape)
        self.threads = threads

    def metadata_json(self, key: str):
        """A JSON-valued metadata entry, decoded (None when absent)."""
        value = self.metadata.get(key)
        if value is None:
            return None
        try:
            return json.loads(value)
        except ValueError:
            raise OnnxFileError(f"{self.path}: its metadata entry {key} is not valid JSON") from None

    def __call__(self, x: Tensor) -> Tensor:
        check_batch(x, self.input_dims, "the input batch")
        out = self.session.run(None, {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()})
        return torch.from_numpy(out[0])

    def runner(self, x: Tensor):
        """A callable that runs the session on `x`, converted once: for timing without the conversion's cost."""
        check_batch(x, self.input_dims, "the input batch")
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return lambda *_: self.session.run(None, feed)

    # so that helpers written for modules (evaluate, compare_on_test) can take it: always in inference mode
    training = False

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        if mode:
            raise RuntimeError("an ONNX model runs inference only")
        return self
