"""Runs made of several trainings: hyper-search then RepOpt (`repopt train`), and the whole `repopt pipeline`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .checkpoint import RESULT
from .recipes import HS_GRAD_CLIP
from .train import TrainConfig, train



def finished_result(out: Path) -> dict | None:
    """The result of a run that already finished in `out` (so a re-run skips it), else None."""
    path = Path(out) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def hs_config(base: TrainConfig, out: Path, hs_epochs: int) -> TrainConfig:
    """The hyper-search run that goes with `base`: same data, model and seed; the HS recipe's optimizer settings."""
    return dataclasses.replace(base, method="hs", optimizer="sgd", epochs=hs_epochs, out=str(out), scales=None,
                               grad_clip=HS_GRAD_CLIP, lr=None, lr_base=None, weight_decay=None, warmup_epochs=None,
                               ema=None, recipe=None, recipe_overrides=[])


def search_scales(hs: TrainConfig) -> tuple[Path, dict]:
    """Train the hyper-search model and return its scales file (a finished search is reused, a stopped one resumed)."""
    result = finished_result(Path(hs.out)) or train(hs)
    return Path(hs.out) / "scales.safetensors", result


def train_repopt(cfg: TrainConfig, hs_epochs: int | None) -> dict:
    """`repopt train --method repopt`: search scales first when none are given, keeping them under OUT/search."""
    if cfg.method == "repopt" and not cfg.scales:
        scales, _ = search_scales(hs_config(cfg, Path(cfg.out) / "search", hs_epochs or cfg.epochs))
        cfg.scales = str(scales)
    return train(cfg)
