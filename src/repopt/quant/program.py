"""Saving the PT2E-quantized program (torchao, before lowering) and lowering it again in another process.

The lowered x86 graph cannot be saved: it holds oneDNN packed weights (opaque tensors) that torch.export.save
refuses. The program one step earlier, after `convert_pt2e`, holds only plain tensors (int8 weights, scales, zero
points) and reference quantize / dequantize ops, so it is re-exported with a dynamic batch and written with
torch.export.save; `load_int8_program` reads it back and lowers it to oneDNN int8 kernels on the machine that runs it.

torch.export.load unpickles some archive entries (pickled weights, custom objects, and sample inputs after a failed
weights-only load), which could run code. `load_int8_program` reads the archive's configs first and refuses any
archive that would need that: what it loads is tensors, JSON and the graph's op names.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from pathlib import PurePosixPath

import torch

from .._io import atomic_write
from .ptq import Int8Model, QuantSettings, _torchao, dynamic_batch

PROGRAM_FORMAT = "repopt-int8-pt2e"
_EXTRA = "repopt.json"


class ProgramFileError(ValueError):
    """A .pt2 file that is not a quantized program repopt wrote, or that would need unpickling to load."""


def save_int8_program(int8: Int8Model, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write the quantized program of `int8` (before lowering), with a dynamic batch dimension, to `path` (.pt2).
    `metadata` (JSON-serialisable) is stored beside it; the file appears whole or not at all."""
    converted = getattr(int8, "converted", None)
    if converted is None or int8.input_shape is None:
        raise ValueError("this Int8Model keeps no quantized program to save (it was loaded, or built elsewhere)")
    example = torch.zeros(2, *int8.input_shape)
    args, shapes = dynamic_batch(example)
    with torch.no_grad():
        program = torch.export.export(converted, args, dynamic_shapes=shapes)
    info = {"format": PROGRAM_FORMAT, "input_shape": list(int8.input_shape), "int8_batch_size": int8.batch_size,
            "images_seen": int8.images_seen, "settings": int8.settings.to_dict(), **(metadata or {})}
    atomic_write(path, lambda tmp: torch.export.save(program, tmp, extra_files={_EXTRA: json.dumps(info)}))
    return os.fspath(path)


def _refuse_pickles(path: str) -> None:
    """Raise ProgramFileError unless every entry torch.export.load would read is a raw tensor, JSON or a
    weights-only loadable tensor file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ProgramFileError(f"{path}: not a torch.export archive ({e})") from None
    with archive:
        for name in archive.namelist():
            parts = PurePosixPath(name).parts
            # entries sit under the archive's root folder: ROOT/data/{weights,constants,sample_inputs}/FILE
            sub = "/".join(parts[1:-1]) if len(parts) > 2 else ""
            file = parts[-1]
            if sub in ("data/weights", "data/constants") and file.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except ValueError:
                    raise ProgramFileError(f"{path}: {name} is not valid JSON") from None
                for key, entry in config.items():
                    pickled = entry.get("use_pickle", True) or not str(entry.get("path_name", "")).startswith(
                        ("weight_", "tensor_"))
                    if pickled:
                        raise ProgramFileError(f"{path}: entry {key!r} would have to be unpickled, which could run "
                                               f"code; refused (repopt writes plain tensors only)")
            elif sub in ("data/weights", "data/constants") and file.endswith(".pt"):
                raise ProgramFileError(f"{path}: {name} is a pickled (legacy format) payload; refused")
            elif sub == "data/sample_inputs":
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - any failure means torch would retry with full unpickling
                    raise ProgramFileError(f"{path}: its sample inputs cannot be loaded weights-only (loading them "
                                           f"could run code); refused") from None


def read_program_info(path: str | os.PathLike) -> dict:
    """The metadata repopt stored in a .pt2 file; ProgramFileError if it holds none (not a file repopt wrote)."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if PurePosixPath(n).parts[1:] == ("extra", _EXTRA)]
            info = json.loads(archive.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ProgramFileError(f"{path}: not a torch.export archive repopt wrote ({type(e).__name__})") from None
    if not isinstance(info, dict) or info.get("format") != PROGRAM_FORMAT:
        raise ProgramFileError(f"{path}: not an INT8 program written by repopt (no {_EXTRA} with "
                               f"format={PROGRAM_FORMAT}); write one with `repopt quantize RUN --save FILE.pt2`")
    return info


def load_int8_program(path: str | os.PathLike, batch_size: int | None = None) -> tuple[Int8Model, dict]:
    """(lowered Int8Model, stored metadata) from a file of `save_int8_program`, lowered on this machine for batches
    of `batch_size` (default: the batch it was calibrated with)."""
    path = os.fspath(path)
    info = read_program_info(path)
    _refuse_pickles(path)
    ao = _torchao()  # registers the quantized_decomposed ops the saved graph calls
    from ._extras import quiet

    with quiet("torch.export", "torch._export", categories=(DeprecationWarning, FutureWarning, UserWarning)):
        program = torch.export.load(path)
        module = program.module()
        b = int(batch_size or info.get("int8_batch_size") or 1)
        example = torch.zeros(b, *info["input_shape"])
        with torch.no_grad():
            graph = ao.lower(module, (example,))
    known = {f.name for f in dataclasses.fields(QuantSettings)}
    stored = {k: v for k, v in info.get("settings", {}).items() if k in known}
    if stored.get("is_qat"):
        stored.pop("activation_observer", None)  # a description for QAT ("moving-average minmax"), not a setting
    settings = QuantSettings(**stored)
    return Int8Model(graph, b, settings, int(info.get("images_seen", 0)), None, tuple(info["input_shape"])), info
