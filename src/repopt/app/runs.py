"""Runs made of several trainings: hyper-search then RepOpt (`repopt train`), and the whole `repopt pipeline`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .checkpoint import RESULT, SCALES
from .recipes import HS_GRAD_CLIP, LR_BASE_SIZE
from .train import TrainConfig, check_same_settings, train

# what a finished run's result.json must hold for a re-run to skip it (the pipeline's report reads these)
RESULT_KEYS = ("method", "top1", "deployed_top1", "train_seconds", "train_images_per_s", "params", "config")


def finished_result(cfg: TrainConfig) -> dict | None:
    """The result of `cfg`'s run when it already finished in cfg.out (a re-run then skips it), else None.

    A result.json that cannot serve as the marker (torn by a crash or a disk error under a version that wrote it in
    place, not a result at all, or from a version that did not record the run's settings) counts as unfinished:
    `train` then resumes from the checkpoint, whose settings it checks, and writes the file again. A result written
    with other settings than `cfg` is refused, as a checkpoint would be.
    """
    out = Path(cfg.out)
    path = out / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: torn JSON, bytes that are not UTF-8
        why = f"cannot be read ({type(e).__name__})"
    else:
        missing = [k for k in RESULT_KEYS if k not in result] if isinstance(result, dict) else ["everything"]
        why = f"lacks {', '.join(missing)}" if missing else None
        if not why and not isinstance(result["config"], dict):
            why = "holds no settings"
        if not why and cfg.method == "hs" and not (out / SCALES).is_file():
            why = f"has no {SCALES} beside it"
    if why:
        if not cfg.quiet:
            print(f"[{cfg.method}] {path} {why}: the run counts as unfinished", flush=True)
        return None
    check_same_settings(result["config"], _as_recorded(cfg, result["config"]), path)
    return result


def _as_recorded(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """`cfg` with the defaults a run fills in before it records its settings (the recipe, the image size; a dataset
    served at its stored size recorded the size of its files, which only reading them would tell)."""
    from ..data import DEFAULT_IMAGE_SIZE, SERVED_AS_STORED

    cfg = dataclasses.replace(cfg).resolve()
    if cfg.image_size is None:
        cfg.image_size = saved.get("image_size") if cfg.dataset in SERVED_AS_STORED else \
            DEFAULT_IMAGE_SIZE.get(cfg.dataset)
    return cfg


def hs_config(base: TrainConfig, out: Path, hs_epochs: int) -> TrainConfig:
    """The hyper-search run that goes with `base`: same data, model and seed; the HS recipe's optimizer settings; none
    of RepOpt's ablations (they change the RepOpt run, not its search)."""
    return dataclasses.replace(base, method="hs", optimizer="sgd", epochs=hs_epochs, out=str(out), scales=None,
                               grad_clip=HS_GRAD_CLIP, lr=None, lr_base=None, weight_decay=None, warmup_epochs=None,
                               ema=None, recipe=None, recipe_overrides=[], reinit=True, mask=True,
                               init_from=None,  # the search starts from scratch (TrainConfig._check_init_from)
                               # and not with a fine-tuning recipe's optimizer (recipes.PRESETS["finetune"])
                               lr_base_size=LR_BASE_SIZE, warmup_fraction=None, momentum=0.9, nesterov=True)


def search_scales(hs: TrainConfig) -> tuple[Path, dict]:
    """Train the hyper-search model and return its scales file (a finished search is reused, a stopped one resumed)."""
    result = finished_result(hs) or train(hs)
    return Path(hs.out) / SCALES, result


def train_repopt(cfg: TrainConfig, hs_epochs: int | None = None) -> dict:
    """`repopt train --method repopt`: search scales first when none are given, keeping them under OUT/search
    (hs_epochs: that search's epochs, by default cfg.epochs)."""
    if cfg.method == "repopt" and not cfg.scales:
        epochs = cfg.epochs if hs_epochs is None else hs_epochs
        scales, _ = search_scales(hs_config(cfg, Path(cfg.out) / "search", epochs))
        cfg.scales = str(scales)
    return train(cfg)
