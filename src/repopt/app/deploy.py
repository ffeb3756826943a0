"""Deployment files: an INT8 ONNX model of a finished run (onnxruntime's static quantization, checked on the test
set, timed against the fp32 ONNX model), evaluation of a saved ONNX or PT2E file, and the pipeline's onnxruntime
INT8 column."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

from .._io import copy_file, write_json
from .checkpoint import MODEL, CheckpointError

SUFFIXES = (".onnx", ".pt2")


def is_deployed_file(path) -> bool:
    """Whether `path` names a saved deployment file (ONNX or a PT2E program) rather than a run or a checkpoint."""
    p = Path(path)
    return p.suffix in SUFFIXES and not p.is_dir()


def settings_path(output) -> Path:
    """Where the settings of an exported file are written: beside it, its name + .json."""
    return Path(f"{os.fspath(output)}.json")


@contextlib.contextmanager
def user_errors():
    """Library errors about the user's files or extras, as UserError (one sentence, exit code 2)."""
    from .cli import UserError
    from ..quant import InputShapeError, MissingExtraError, OnnxFileError, ProgramFileError

    try:
        yield
    except (InputShapeError, OnnxFileError, ProgramFileError, MissingExtraError) as e:
        raise UserError(str(e)) from None


def finished_model(run) -> Path:
    """The run's model.safetensors; a run directory without one (training stopped or still going) is refused."""
    p = Path(run)
    if p.is_dir() and not (p / MODEL).is_file():
        state = "a checkpoint.pt (training stopped or still running)" if (p / "checkpoint.pt").is_file() else \
            "no checkpoint either"
        raise CheckpointError(f"{p} holds no finished model ({MODEL}), only {state}; finish the run by re-running "
                              f"its command, or pass its checkpoint.pt explicitly to export that state")
    return p


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def classifier_metadata(cfg: dict, precision: str, extra: dict | None = None) -> dict[str, str]:
    """metadata_props that mark an ONNX file as a classifier repopt wrote, with the training config it came from."""
    from .. import __version__
    from ..quant import CLASSIFIER_FORMAT, FORMAT_KEY

    meta = {FORMAT_KEY: CLASSIFIER_FORMAT, "repopt.version": __version__, "repopt.precision": precision,
            "repopt.config": json.dumps(cfg)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return meta


def export_int8(run, output, *, settings, dataset=None, data_dir=None, batch_size: int = 64, threads: int | None = 1,
                repeats: int = 30, opset: int | None = None) -> dict:
    """Export the deployed fp32 network of `run` to ONNX, quantize it with onnxruntime (static calibration on the
    dataset's training images), check fp32 vs INT8 on the test set and time both; write the INT8 file to `output` and
    its settings to `settings_path(output)`. Nothing is written unless every step succeeded."""
    import torch

    from ..data import DEFAULT_IMAGE_SIZE
    from ..quant import OnnxModel, export_onnx, quantize_onnx, set_metadata
    from ..quant.onnx_int8 import check_batch
    from .commands.quantize import compare_on_test, dataset_for, load_deployed

    from .checkpoint import find_model_file

    model_file = find_model_file(finished_model(run))
    model, cfg = load_deployed(model_file)
    ds = dataset_for(SimpleNamespace(dataset=dataset, data_dir=data_dir), cfg)
    size = cfg.get("image_size") or DEFAULT_IMAGE_SIZE.get(cfg["dataset"], 32)
    s = settings.resolved()
    calib = ds.calibration_batches(s.calib_batches, batch_size)
    if calib:  # refuse data that cannot fit before the (slow) export; quantize_onnx checks every batch again
        check_batch(calib[0][0], [None, 3, size, size], "calibration batch 0")
    normalization = {"mean": list(ds.mean), "std": list(ds.std), "of": f"{ds.name} training images, [0, 1] units"}
    inp = {"name": "input", "shape": ["N", 3, size, size], "normalization": normalization}
    with tempfile.TemporaryDirectory(prefix="repopt-export-") as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        example = torch.zeros(2, 3, size, size)
        export_onnx(model, example, fp32_path, fold=False, opset=opset,
                    metadata=classifier_metadata(cfg, "fp32", {"repopt.input": inp}))
        report = quantize_onnx(fp32_path, int8_path, calib, s)
        set_metadata(int8_path, {"repopt.precision": "int8", "repopt.int8": json.dumps(report)})
        fp32, int8 = OnnxModel(fp32_path, threads), OnnxModel(int8_path, threads)
        test = compare_on_test(fp32, {"int8": int8}, ds.test_batches(batch_size))
        latency = _latency(fp32, int8, calib[0][0], repeats, threads)
        out = {"file": os.fspath(output), "bytes": int8_path.stat().st_size, "sha256": _sha256(int8_path),
               "fp32_bytes": fp32_path.stat().st_size,
               "source": {"run": os.fspath(run), "model_file": os.fspath(model_file), "method": cfg["method"],
                          "arch": cfg["arch"], "dataset": cfg["dataset"], "epochs": cfg.get("epochs"),
                          "seed": cfg.get("seed")},
               "input": inp,
               "calibration": {"dataset": ds.name, "batches": len(calib), "batch_size": batch_size,
                               "images": report["images_seen"],
                               "images_from": "training set, unaugmented, one fixed shuffle (seed 0)"},
               "settings": report,
               "test": {"dataset": ds.name, "images": ds.num_test, "backend": "onnxruntime", **test},
               "latency": latency,
               "command": _command(run, output, s, dataset, data_dir, batch_size, threads, repeats, opset),
               "versions": {"torch": torch.__version__, **{k: report.get(k) for k in ("onnxruntime", "onnx")}}}
        copy_file(int8_path, output)
    write_json(settings_path(output), out)
    return out


def _latency(fp32, int8, x, repeats: int, threads) -> dict:
    """ms per session run of both files at batch 1 and at the batch of `x`: median of alternating runs (both see the
    same machine load), input converted to numpy once, outside the timing."""
    from .commands.quantize import paired_latency_ms

    out = {"backend": "onnxruntime CPUExecutionProvider", "threads": threads or "onnxruntime default",
           "repeats": repeats, "timing": "median of alternating fp32 / int8 session runs on the same batch",
           "cpus": os.cpu_count(), "load_average_1min": _load()}
    for b in sorted({1, x.shape[0]}):
        f_ms, q_ms = paired_latency_ms(fp32.runner(x[:b]), int8.runner(x[:b]), None, repeats)
        f, q = statistics.median(f_ms), statistics.median(q_ms)
        # the fastest runs too: on a shared CPU, longer runs are descheduled more often, inflating slow medians more
        out[f"batch_{b}"] = {"batch": b, "fp32_ms": f, "int8_ms": q, "fp32_min_ms": min(f_ms),
                             "int8_min_ms": min(q_ms), "int8_over_fp32": q / f,
                             "int8_over_fp32_of_minima": min(q_ms) / min(f_ms)}
    return out


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _command(run, output, s, dataset, data_dir, batch_size, threads, repeats, opset) -> str:
    parts = ["repopt", "export", os.fspath(run), "--int8", "-o", os.fspath(output), "--calib-batches",
             str(s.calib_batches), "--calib-method", s.calibrate_method, "--batch-size", str(batch_size),
             "--threads", str(threads or 0), "--repeats", str(repeats)]
    parts += ["--per-tensor"] if not s.per_channel else []
    parts += ["--dataset", dataset] if dataset else []
    parts += ["--data-dir", os.fspath(data_dir)] if data_dir else []
    parts += ["--opset", str(opset)] if opset else []
    return " ".join(parts)


def load_deployed_file(path, threads: int | None = None):
    """(callable model, training config, description) of a saved .onnx (onnxruntime) or .pt2 (torchao) file."""
    from ..quant import OnnxModel, OnnxFileError, load_int8_program

    if Path(path).suffix == ".pt2":
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file")
        model, info = load_int8_program(path)
        cfg = info.get("config")
        desc = {"backend": "torchao PT2E, lowered on load", "precision": "int8",
                "input_size": info["input_shape"][-1]}
    else:
        model = OnnxModel(path, threads)
        cfg = model.metadata_json("repopt.config")
        size = model.input_dims[-1]
        desc = {"backend": "onnxruntime", "precision": model.metadata.get("repopt.precision", "unknown"),
                "input_size": size if isinstance(size, int) else None}
    if not isinstance(cfg, dict) or not {"method", "arch", "dataset", "num_classes"} <= cfg.keys():
        raise OnnxFileError(f"{path}: its metadata holds no training config; not a classifier repopt wrote")
    return model, cfg, desc


def evaluate_file(path, dataset=None, data_dir=None, batch_size: int = 256, threads: int | None = None) -> dict:
    """Top-1 and loss of a saved .onnx / .pt2 classifier on a test set, the same way `repopt eval RUN` measures a
    run: the training dataset by default, served at the file's input size, normalized with its training statistics."""
    from .cli import UserError
    from .checkpoint import run_data_options
    from ..data import load_dataset
    from .train import evaluate

    model, cfg, desc = load_deployed_file(path, threads)
    name = dataset or cfg["dataset"]
    folder = data_dir if dataset else cfg.get("data_dir")
    options = run_data_options(cfg) if name == cfg["dataset"] else {}
    ds = load_dataset(name, folder, desc["input_size"] or cfg.get("image_size"), **options)
    if ds.num_classes != cfg["num_classes"]:
        raise UserError(f"{path} has {cfg['num_classes']} classes but {name} has {ds.num_classes}")
    top1, loss = evaluate(model, ds.test_batches(batch_size), device="cpu")  # a session or graph: no parameters to ask
    return {"checkpoint": os.fspath(path), "method": cfg["method"], "arch": cfg["arch"], "dataset": name,
            "top1": top1, "loss": loss, "deployed": True, **desc}


def int8_onnx_column(run_dir: Path, calib_batches: int = 8, quiet: bool = True) -> dict | None:
    """The pipeline's INT8 column from onnxruntime: writes RUN/model.int8.onnx (+ .json) and returns its test top-1,
    or None when the `export` extra is missing."""
    from ..quant import MissingExtraError, OnnxQuantSettings

    try:
        out = export_int8(run_dir, run_dir / "model.int8.onnx", settings=OnnxQuantSettings(calib_batches=calib_batches),
                          repeats=10)
    except MissingExtraError:
        if not quiet:
            print("onnx / onnxruntime are not installed: no INT8 column (pip install 'repopt[export]')")
        return None
    return {"int8_top1": out["test"]["int8_top1"], "int8_settings": out["settings"],
            "int8_file": os.fspath(run_dir / "model.int8.onnx")}
