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

from .._io import atomic_write, load_error_message, write_error_reason
from ..pretrained import CHECKPOINT, MODEL, MODEL_FORMAT, run_model_file  # the library reads run files too (init_from)

RESULT = "result.json"
SCALES = "scales.safetensors"  # a hyper-search run's scales


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or does not belong to this run."""


# what `train` reads back from a checkpoint to resume
RUN_KEYS = ("config", "model", "optimizer", "scheduler", "rng", "epoch", "train_seconds", "skipped_steps")


def _write_or_explain(path: Path, write) -> None:
    from safetensors import SafetensorError

    try:
        atomic_write(path, write)
    # disk full, quota, permissions (torch.save raises RuntimeError, safetensors its own error): the old file is
    # untouched, since atomic_write only renames a complete temp file over it
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"{path} could not be written ({write_error_reason(e)}); the previous file is left as "
                              f"it was") from None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    _write_or_explain(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(load_error_message(path, e, "checkpoint, truncated or corrupt")) from None


def load_run_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint to resume from, with every entry `train` reads back."""
    ckpt = load_checkpoint(path)
    missing = [k for k in RUN_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(RUN_KEYS)
    if missing or not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path} is not a repopt training checkpoint (it lacks "
                              f"{', '.join(missing) or 'a config dict'}); move it away or use another --out")
    return ckpt


def save_model(path: Path, model: nn.Module, config: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": MODEL_FORMAT, "config": json.dumps(config), **(extra or {})}
    _write_or_explain(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def find_model_file(path: str | os.PathLike) -> Path:
    """A run directory, its model.safetensors or its checkpoint.pt -> the file to load."""
    p = Path(path)
    if p.is_dir():
        file = run_model_file(p)
        if file is not None:
            return file
        raise CheckpointError(f"{p}: no {MODEL} or {CHECKPOINT} in this directory")
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file or run directory")
    return p


def load_trained(path: str | os.PathLike, deploy: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained model (eval mode) and its training config from a run directory or model file.

    deploy=True returns the plain network that is deployed: RepVGG blocks fused into single convs.
    """
    from ..models import create, reparameterize_model

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
        if meta.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{file}: not a repopt model file (no format={MODEL_FORMAT} metadata)")
        try:
            config = json.loads(meta.get("config", "null"))
        except ValueError:
            config = None  # refused below, with the other configs that name no model
    else:
        ckpt = load_checkpoint(file)
        if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{file}: not a repopt training checkpoint (no config/model entries)")
        config, state = ckpt["config"], ckpt["model"]
    needed = ("arch", "method", "num_classes", "dataset")
    missing = [k for k in needed if k not in config] if isinstance(config, dict) else list(needed)
    if missing:
        raise CheckpointError(f"{file}: its training config lacks {', '.join(missing)}; not a file repopt wrote")
    try:
        model = create(config["arch"], mode=mode_of(config["method"]), num_classes=config["num_classes"],
                       **config.get("model_options", {}))
    except (KeyError, TypeError, ValueError) as e:  # names no model (or method) we can build
        raise CheckpointError(f"{file}: its training config does not describe a model repopt can build "
                              f"({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{file}: weights do not fit {config['arch']} ({config['method']}): {first}") from None
    model.eval()
    if deploy and config["method"] == "repvgg":
        model = reparameterize_model(model)
    return model, config


def mode_of(method: str) -> str:
    return {"repopt": "target", "plain": "target", "repvgg": "repvgg", "hs": "hs"}[method]


def run_data_options(config: dict[str, Any]) -> dict[str, Any]:
    """The load_dataset options that serve a run's dataset as the run saw it, without the training-only batch
    augmentation: its data options and its training subset (INT8 calibration reads the images it trained on). What
    evaluation, calibration and quantization of a saved run load its own dataset with."""
    from ..data import serving_options

    options = serving_options(config.get("data_options"))
    if config.get("train_subset") is not None:
        options["train_subset"] = config["train_subset"]
    if config.get("classes") is not None:  # the classes it was trained on, relabelled as it saw them
        options["classes"] = config["classes"]
    return options
