"""The scales container: per target conv (by qualified module name), the constant per-channel scale of each branch.

Our own files are safetensors with metadata; the `.pth` files released with the paper are read weights-only and their
keys translated (`stageK.i.scale_conv.weight` -> conv `stageK.i.conv`, branch '3x3', ...). Validation against a model
is strict: every mismatch is an error that names the layer, never a silent fallback.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from .branches import IDENTITY, BranchError, BranchSet, ConvGeometry, branch_kernel_size

FORMAT = "repopt-scales"
FORMAT_VERSION = "1"
_SEP = "::"


class ScalesError(ValueError):
    """Scales that do not fit a model, or a scales file that cannot be read."""


class Scales(MutableMapping):
    """conv module name -> {branch name: Tensor[C_out]}, plus free-form string metadata (arch, source, ...)."""

    def __init__(self, entries: Mapping[str, Mapping[str, Tensor]] | None = None,
                 metadata: Mapping[str, str] | None = None):
        self._entries: dict[str, dict[str, Tensor]] = {}
        self.metadata: dict[str, str] = dict(metadata or {})
        for name, branches in (entries or {}).items():
            self[name] = branches

    def __getitem__(self, name: str) -> dict[str, Tensor]:
        return self._entries[name]

    def __setitem__(self, name: str, branches: Mapping[str, Tensor]) -> None:
        if not isinstance(branches, Mapping) or not branches:
            raise ScalesError(f"scales for {name!r} must be a non-empty mapping branch -> Tensor[C_out]")
        entry = {}
        for branch, value in branches.items():
            try:
                branch_kernel_size(branch)
            except BranchError as e:
                raise ScalesError(f"{name}: {e}") from None
            t = torch.as_tensor(value).detach().to("cpu")
            # float64 scales stay float64 (the proofs need them exact); anything else becomes float32
            entry[branch] = t.to(t.dtype if t.dtype == torch.float64 else torch.float32).reshape(-1).clone()
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Scales({len(self)} convs, metadata={self.metadata})"

    # ---- validation --------------------------------------------------------------------------------------------
    def bind(self, model: nn.Module, strict: bool = True) -> dict[str, tuple[nn.Conv2d, BranchSet]]:
        """Match every entry to a conv of `model` and build its BranchSet.

        Errors name the layer: an entry for a module the model lacks (or that is not a Conv2d), a wrong channel
        count, NaN/inf, a branch that does not fit the kernel, an identity where shapes forbid it. With strict=True
        every target conv of the model (repopt.targets.target_convs) must have an entry.
        """
        from .targets import target_convs

        modules = dict(model.named_modules())
        arch = self.metadata.get("arch")
        where = f" (scales for {arch})" if arch else ""
        bound = {}
        for name, branches in self._entries.items():
            conv = modules.get(name)
            if not isinstance(conv, nn.Conv2d):
                what = "is not a Conv2d" if conv is not None else "does not exist in the model"
                raise ScalesError(f"layer {name!r}{where} {what}; the scales do not fit this model")
            try:
                bound[name] = (conv, BranchSet(ConvGeometry.of(conv), branches, name=name))
            except BranchError as e:
                raise ScalesError(f"layer {name!r}{where}: {e.reason}") from None
        if strict:
            missing = [n for n in target_convs(model) if n not in bound]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise ScalesError(f"layer {missing[0]!r}{more} of the model has no scales{where}; pass strict=False "
                                  f"to train those convs with the plain rule")
        return bound


def as_scales(obj) -> Scales:
    if isinstance(obj, Scales):
        return obj
    if isinstance(obj, Mapping):
        return Scales(obj)
    if isinstance(obj, (str, os.PathLike)):
        return load_scales(obj)
    raise TypeError(f"expected repopt.Scales, a dict or a path, got {type(obj).__name__}")


# ---- files ---------------------------------------------------------------------------------------------------------
def save_scales(scales: Scales | Mapping, path: str | os.PathLike, model: nn.Module | None = None,
                **metadata: str) -> Path:
    """Write safetensors atomically (temp file, then rename). With `model`, record each conv's weight shape."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ._io import atomic_write, write_error_reason

    scales = as_scales(scales)
    meta = {**scales.metadata, **{k: str(v) for k, v in metadata.items()},
            "format": FORMAT, "format_version": FORMAT_VERSION}
    if model is not None:
        modules = dict(model.named_modules())
        meta["shapes"] = json.dumps({n: list(modules[n].weight.shape) for n in scales if n in modules})
    tensors = {f"{name}{_SEP}{branch}": t.contiguous() for name, entry in scales.items() for branch, t in entry.items()}
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except (OSError, SafetensorError) as e:  # disk full, no permission: `path` keeps what it held before
        raise ScalesError(f"{path} could not be written ({write_error_reason(e)}); the previous file is left as "
                          f"it was") from None
    return path


def load_scales(path: str | os.PathLike) -> Scales:
    """Read a repopt safetensors scales file, or a released reference `.pth` (weights-only)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ScalesError(f"scales file {str(path)!r} {what}")
    from ._io import is_safetensors

    with open(path, "rb") as f:
        head = f.read(2)
    if not is_safetensors(path) and (head[:2] == b"PK" or head[:1] == b"\x80"):  # a zip (torch.save) or a pickle
        scales = _load_reference(path)
    else:
        scales = _load_safetensors(path)
    for name, entry in scales.items():  # a diverged search must not reach an optimizer
        for branch, t in entry.items():
            if not torch.isfinite(t).all():
                raise ScalesError(f"{path}: layer {name!r} branch {branch!r} holds NaN or inf scales")
    return scales


def _load_safetensors(path: Path) -> Scales:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ScalesError(f"{path}: not a readable safetensors scales file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ScalesError(f"{path}: a safetensors file, but not a repopt scales file (no format={FORMAT} metadata)")
    entries: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if _SEP not in key:
            raise ScalesError(f"{path}: unexpected key {key!r} (expected 'conv_name{_SEP}branch')")
        name, branch = key.rsplit(_SEP, 1)
        entries.setdefault(name, {})[branch] = t
    meta.pop("shapes", None)
    meta.setdefault("source", str(path))
    return Scales(entries, {k: v for k, v in meta.items() if k not in ("format", "format_version")})


# Keys of the released files: (pattern, target conv name template, branch).
_REFERENCE_KEYS = [
    (re.compile(r"^(?P<block>.+)\.scale_conv\.weight$"), "{block}.conv", "3x3"),
    (re.compile(r"^(?P<block>.+)\.scale_1x1\.weight$"), "{block}.conv", "1x1"),
    (re.compile(r"^(?P<block>.+)\.scale_identity\.weight$"), "{block}.conv", IDENTITY),
    # RepOpt-GhostNet: the depthwise "cheap operation" conv is cheap_operation.0, its scale cheap_operation.1, and
    # the fusion scale is the trainable identity of that conv's imaginary block.
    (re.compile(r"^(?P<block>.+)\.cheap_operation\.1\.weight$"), "{block}.cheap_operation.0", "3x3"),
    (re.compile(r"^(?P<block>.+)\.fusion_scale\.weight$"), "{block}.cheap_operation.0", IDENTITY),
]


def _load_reference(path: Path) -> Scales:
    from ._io import load_error_message

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # code in the pickle, truncated zip, foreign bytes, ...
        raise ScalesError(load_error_message(path, e, "PyTorch scales file")) from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ScalesError(f"{path}: expected a state dict of scale tensors")
    entries: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        if not isinstance(key, str):
            raise ScalesError(f"{path}: key {key!r} is not a known reference scale key")
        key = key.removeprefix("module.")
        for pattern, template, branch in _REFERENCE_KEYS:
            m = pattern.match(key)
            if m:
                entries.setdefault(template.format(**m.groupdict()), {})[branch] = t
                break
        else:
            raise ScalesError(f"{path}: key {key!r} is not a known reference scale key")
    return Scales(entries, {"source": f"reference:{path.name}"})
