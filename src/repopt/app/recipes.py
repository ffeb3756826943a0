"""The training recipe: the paper's numbers, in one place, with where each comes from.

The paper (Ding et al., ICLR 2023) and its code give the peak learning rate **per 256 images** and scale it linearly
with the global batch (its code multiplies base lr, warmup lr and minimum lr by batch x world size / 256): BASE_LR 0.1
is 0.025 at batch 64. `repopt train` follows it: `--lr-base` is that per-256 rate, `--lr` (when given) an absolute peak
rate that overrides it. For the adaptive optimizers, which the paper does not train, the base is scaled by the square
root of the batch ratio (the usual rule for Adam-family optimizers, and timm's default for them).

    source                                  number
    paper code, ImageNet and CIFAR configs  SGD base lr 0.1 per 256 images, linear scaling with the global batch
    paper code, both configs                weight decay 4e-5 (1-D parameters exempt; identity scales decayed in the HS)
    paper code, both configs                nesterov momentum 0.9, label smoothing 0.1, cosine decay per iteration
    paper code, ImageNet config             5 warmup epochs of 120 -> warmup over the first 5/120 of the run
    paper code, HS (CIFAR-100) config       gradient clipping 5.0 in the hyper-search only (never with RepOpt)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerDefaults:
    lr_base: float       # peak learning rate per LR_BASE_SIZE images
    weight_decay: float
    scaling: str         # how lr_base follows the global batch: "linear" or "sqrt"


LR_BASE_SIZE = 256
DEFAULTS = {
    "sgd": OptimizerDefaults(lr_base=0.1, weight_decay=4e-5, scaling="linear"),   # the paper
    # not in the paper: repopt's earlier defaults at batch 64 (2e-3, 2e-4), expressed per 256 images by the sqrt rule
    "adamw": OptimizerDefaults(lr_base=4e-3, weight_decay=0.05, scaling="sqrt"),
    "lion": OptimizerDefaults(lr_base=4e-4, weight_decay=0.5, scaling="sqrt"),
}
WARMUP_FRACTION = 5 / 120      # the paper's ImageNet recipe: 5 warmup epochs of 120
HS_GRAD_CLIP = 5.0             # the paper's hyper-search recipe clips; never while training with RepOpt


def scaled_lr(lr_base: float, global_batch: int, scaling: str, base_size: int = LR_BASE_SIZE) -> float:
    """The peak learning rate for `global_batch` images per step, from a rate given per `base_size` images."""
    ratio = global_batch / base_size
    return lr_base * (ratio if scaling == "linear" else math.sqrt(ratio))


def default_warmup_epochs(epochs: int, fraction: float | None = None) -> float:
    return epochs * (WARMUP_FRACTION if fraction is None else fraction)


def describe_lr(lr: float, lr_base: float | None, global_batch: int, scaling: str,
                base_size: int = LR_BASE_SIZE) -> str:
    """'0.025 (0.1 per 256 images x 64/256, linear)' or '0.05 (given with --lr)', for the start of a run."""
    if lr_base is None:
        return f"{lr:g} (given with --lr)"
    rule = f"x {global_batch}/{base_size}" if scaling == "linear" else f"x sqrt({global_batch}/{base_size})"
    return f"{lr:g} ({lr_base:g} per {base_size} images {rule}, {scaling} scaling)"


# -- the paper's recipes as presets (`--recipe NAME`) ------------------------------------------------------------------
# Data, not code: each preset is the TrainConfig values it sets. The trainer's defaults above stay as they are; a flag
# given on the command line wins over a preset's value, and the run prints which it overrode.
#
#   source                                            number
#   RepOptimizers README + readme_reproduce_experiments:  ImageNet: 120 epochs, 8 GPUs x 32, BASE_LR 0.1, WEIGHT_DECAY
#     main_repopt.py command lines                         4e-5, WARMUP_EPOCHS 5, LABEL_SMOOTHING 0.1, AUG.PRESET raug15
#   RepOptimizers main_repopt.py                      BASE_LR, WARMUP_LR and MIN_LR are all multiplied by
#                                                     batch x world / 256; SGD nesterov, momentum 0.9
#   RepOptimizers config.py                           WARMUP_LR 0.0, MIN_LR 0.0 (neither command overrides them, so the
#                                                     scaled values are 0 too: repopt's warmup starts at ~0, its cosine
#                                                     ends at 0); TEST.CROP False: Resize(224) + CenterCrop(224);
#                                                     test batch = per-GPU batch // 2
#   RepOptimizers lr_scheduler.py                     timm CosineLRScheduler stepped every iteration (t_in_epochs False)
#   readme_reproduce_experiments (hyper-search)       CIFAR-100: 240 epochs, batch 256 on 1 GPU, BASE_LR 0.1, WEIGHT_DECAY
#                                                     4e-5, WARMUP_EPOCHS 5 (the paper's text says 10), LABEL_SMOOTHING
#                                                     0.0, RandomCrop(32, padding 4) + flip
#   RepOptimizers config.py, earlier version          CLIP_GRAD 5.0 (0.0 in the later one); kept for the search only,
#                                                     never with RepOpt (clipping breaks the equivalence)
_IMAGENET = dict(dataset="folder", image_size=224, epochs=120, batch_size=256, optimizer="sgd", lr=None, lr_base=0.1,
                 lr_base_size=LR_BASE_SIZE, weight_decay=4e-5, warmup_epochs=5.0, momentum=0.9, nesterov=True,
                 label_smoothing=0.1, grad_clip=None,
                 data_options={"loader": "stream", "augment": "raug15"})  # eval: Resize(224) + CenterCrop(224)
_HS_CIFAR100 = dict(method="hs", dataset="cifar100", image_size=32, epochs=240, batch_size=256, optimizer="sgd",
                    lr=None, lr_base=0.1, lr_base_size=LR_BASE_SIZE, weight_decay=4e-5, warmup_epochs=5.0,
                    momentum=0.9, nesterov=True, label_smoothing=0.0, grad_clip=HS_GRAD_CLIP, data_options={})
_SIZES = ("b1", "b2", "l1", "l2")
PRESETS: dict[str, dict] = {
    **{f"imagenet-repopt-vgg-{s}": dict(_IMAGENET, method="repopt", arch=f"repopt_vgg_{s}") for s in _SIZES},
    # the RepVGG baselines: the same recipe, the multi-branch model and plain SGD
    **{f"imagenet-repvgg-{s}": dict(_IMAGENET, method="repvgg", arch=f"repopt_vgg_{s}") for s in _SIZES},
    **{f"cifar100-hs-{s}": dict(_HS_CIFAR100, arch=f"repopt_vgg_{s}") for s in _SIZES},
}
# Fine-tuning (`--recipe finetune`, with --init-from): BiT-HyperRule's small-data fine-tuning optimizer (Kolesnikov et
# al., "Big Transfer (BiT)", ECCV 2020; code: google-research/big_transfer), on repopt's warmup + cosine schedule.
#
#   source                                            number
#   big_transfer README ("BiT-HyperRule") and         peak lr 0.003 at batch 512 (lr_base 0.003 per 512 images, scaled
#     bit_hyperrule.get_lr(base_lr=0.003)               linearly to the global batch as every repopt recipe is)
#   bit_pytorch/train.py                              SGD momentum 0.9, not nesterov; "no weight-decay"; plain
#                                                     cross-entropy (no label smoothing); model.parameters(): every
#                                                     weight is fine-tuned, nothing frozen
#   bit_hyperrule.get_schedule (below 20,000 images)  linear warmup over 100 of its 500 steps: the first 1/5 of the run
#   bit_hyperrule.get_mixup (below 20,000 images)     no mixup (repopt's default too)
# Not taken over: BiT's length is a number of steps (500 of 512 images below 20,000 images, i.e. 256,000 images seen),
# so the preset sets no epochs (give --epochs; 256 epochs of 1,000 images is BiT's); its decay (/10 at steps 200, 300
# and 400) is repopt's cosine here; its zero-initialized head is a fresh default-initialized nn.Linear here.
_FINETUNE = dict(optimizer="sgd", lr=None, lr_base=0.003, lr_base_size=512, weight_decay=0.0, momentum=0.9,
                 nesterov=False, label_smoothing=0.0, warmup_epochs=None, warmup_fraction=1 / 5)
# Measured (docs/results.md section 11, Fashion-MNIST classes 0-4 -> 5-9, 1,000 images, 3 seeds): from a small, narrow
# pre-training this preset ends 4.80 +- 0.54 points below the default recipe on the same weights, and below training
# from scratch; BiT chose its rate for ImageNet-21k models. Kept as BiT's, with that said where it is described.
PRESETS["finetune"] = _FINETUNE
PRESET_NOTES = {
    "imagenet": "the paper's ImageNet recipe (8 GPUs x 32 = global batch 256; lr, warmup lr 0 and min lr 0 scale "
                "with the global batch; test batch per GPU = 16 in the reference code)",
    "finetune": "fine-tuning from --init-from with BiT-HyperRule's small-data optimizer (no epochs: give --epochs; "
                "with --method repopt the scales act as gradient multipliers only; for broadly pre-trained weights: "
                "after a small pre-training the default recipe fine-tuned 4.8 points better, docs/results.md "
                "section 11)",
    "cifar100-hs": "the paper's hyper-search on CIFAR-100 (its reproduction command: warmup 5 epochs, no label "
                   "smoothing; gradient clipping 5.0 in the search only)",
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown recipe {name!r}; known recipes: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def merge_preset(name: str | None, explicit: dict) -> tuple[dict, dict]:
    """(settings, overridden): the preset's values with every explicitly given one on top (data_options merged key
    by key), and {key: (preset value, given value)} for the explicit ones that differ from the preset."""
    if name is None:
        return dict(explicit), {}
    base = preset(name)
    merged, overridden = dict(base), {}
    for key, value in explicit.items():
        if key == "data_options":
            value = {**base.get("data_options", {}), **value}
            for k, v in value.items():
                if base.get("data_options", {}).get(k, v) != v:
                    overridden[f"data_options.{k}"] = (base["data_options"][k], v)
        elif key in base and base[key] != value:
            overridden[key] = (base[key], value)
        merged[key] = value
    return merged, overridden


def describe_preset(name: str, run: dict, overridden) -> str:
    """The preset in full, one `key = value` per line, marking the keys in `overridden` with the run's own value
    (`run`: the run's TrainConfig as a dict)."""
    notes = next((v for k, v in PRESET_NOTES.items() if name.startswith(k)), "")
    lines = [f"recipe {name}: {notes}"]
    for key, value in preset(name).items():
        items = value.items() if key == "data_options" else [(None, value)]
        for sub, v in items:
            full = f"data_options.{sub}" if sub else key
            if full in overridden:
                now = run.get("data_options", {}).get(sub) if sub else run.get(key)
                lines.append(f"  {full} = {now!r}   (given on the command line; the recipe has {v!r})")
            else:
                lines.append(f"  {full} = {v!r}")
    return "\n".join(lines)
