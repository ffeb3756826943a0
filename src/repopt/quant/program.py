"""Saving the PT2E-quantized program (torchao, before lowering) and lowering it again in another process.

The lowered x86 graph cannot be saved: it holds oneDNN packed weights (opaque tensors) that torch.export.save
refuses. The program one step earlier, after `convert_pt2e`, holds only plain tensors (int8 weights, scales, zero
points) and reference quantize / dequantize ops, so it is re-exported with a dynamic batch and written with
torch.export.save; `load_int8_program` reads it back and lowers it to oneDNN int8 kernels on the machine that runs it.

torch.export.load can run code from the file (its legacy-layout fallback unpickles, so do pickled entries; the
program's JSON reaches eval and exec): `load_int8_program` reads the file once, lets safe_pt2 refuse anything that
could run code, and hands the same bytes to the new-format reader only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import PurePosixPath

import torch

from .._io import atomic_write
from .ptq import Int8Model, QuantSettings, _torchao, dynamic_batch
from .safe_pt2 import ProgramFileError, check_archive, load_program, read_archive

__all__ = ["ProgramFileError", "save_int8_program", "read_program_info", "load_int8_program"]

PROGRAM_FORMAT = "repopt-int8-pt2e"
_EXTRA = "repopt.json"


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


def _program_info(path: str, archive: zipfile.ZipFile) -> dict:
    """The metadata repopt stored in an open .pt2 archive; ProgramFileError if it holds none."""
    try:
        names = [n for n in archive.namelist() if PurePosixPath(n).parts[1:] == ("extra", _EXTRA)]
        info = json.loads(archive.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ProgramFileError(f"{path}: not a torch.export archive repopt wrote ({type(e).__name__})") from None
    if not isinstance(info, dict) or info.get("format") != PROGRAM_FORMAT:
        raise ProgramFileError(f"{path}: not an INT8 program written by repopt (no {_EXTRA} with "
                               f"format={PROGRAM_FORMAT}); write one with `repopt quantize RUN --save FILE.pt2`")
    return info


def read_program_info(path: str | os.PathLike) -> dict:
    """The metadata repopt stored in a .pt2 file; ProgramFileError if it holds none (not a file repopt wrote)."""
    path = os.fspath(path)
    _, archive = read_archive(path)
    with archive:
        return _program_info(path, archive)


def load_int8_program(path: str | os.PathLike, batch_size: int | None = None) -> tuple[Int8Model, dict]:
    """(lowered Int8Model, stored metadata) from a file of `save_int8_program`, lowered on this machine for batches
    of `batch_size` (default: the batch it was calibrated with)."""
    path = os.fspath(path)
    data, archive = read_archive(path)  # read once: what is checked is what torch loads
    with archive:
        info = _program_info(path, archive)
        check_archive(path, archive)  # before torchao: a crafted file is refused even without the `quant` extra
        ao = _torchao()  # registers the quantized_decomposed ops the saved graph calls
        from ._extras import quiet

        with quiet("torch.export", "torch._export", categories=(DeprecationWarning, FutureWarning, UserWarning)):
            program, _ = load_program(path, data, archive)  # checks again, then the new-format reader
    with quiet("torch.export", "torch._export", categories=(DeprecationWarning, FutureWarning, UserWarning)):
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
