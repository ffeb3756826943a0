"""Checkpoints and trained-model files: written atomically, read weights-only.

A run directory holds `checkpoint.pt` (everything needed to resume: model, optimizer incl. its multipliers' scales,
scheduler, RNG, epoch, config) and, once finished, `model.safetensors` (the trained weights with the config in the
metadata) and `result.json`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
RESULT = "result.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a crash or a full disk never leaves `path` half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load (it holds more than tensors and plain values): {e}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None


def save_model(path: Path, model: nn.Module, config: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "repopt-model", "config": json.dumps(config), **(extra or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def find_model_file(path: str | os.PathLike) -> Path:
    """A run directory, its model.safetensors or its checkpoint.pt -> the file to load."""
    p = Path(path)
    if p.is_dir():
        for name in (MODEL, CHECKPOINT):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: no {MODEL} or {CHECKPOINT} in this directory")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run directory")
    return p


def load_trained(path: str | os.PathLike, deploy: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) and its training config from a run directory or model file.

    deploy=True returns the plain network that is deployed: RepVGG blocks fused into single convs.
    """
    from .models import create, reparameterize_model

    file = find_model_file(path)
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: not a readable model file ({e})") from None
        if meta.get("format") != "repopt-model":
            raise CheckpointError(f"{file}: not a repopt model file (no format=repopt-model metadata)")
        config = json.loads(meta["config"])
    else:
        ckpt = load_checkpoint(file)
        if "config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{file}: not a repopt training checkpoint (no config/model entries)")
        config, state = ckpt["config"], ckpt["model"]
    model = create(config["arch"], mode=mode_of(config["method"]), num_classes=config["num_classes"],
                   **config.get("model_options", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{file}: weights do not fit {config['arch']} ({config['method']}): {first}") from None
    model.eval()
    if deploy and config["method"] == "repvgg":
        model = reparameterize_model(model)
    return model, config


def mode_of(method: str) -> str:
    return {"repopt": "target", "plain": "target", "repvgg": "repvgg", "hs": "hs"}[method]
