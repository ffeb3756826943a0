"""Arguments shared by `repopt train`, `search` and `pipeline`, and their translation into a TrainConfig."""
from __future__ import annotations

import dataclasses

from ..train import TrainConfig

# What a flag left out means when no --recipe gives it is TrainConfig's default (app/train.py), the one definition;
# a command may change a few of them (`defaults=`: the pipeline's shorter runs), and says so in its help. The
# argparse defaults are None so that a recipe can tell a flag given explicitly from one left out.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def add_training_arguments(p, out_default: str, hs_epochs: bool = True, defaults: dict | None = None) -> None:
    """The data, model and training flags; `hs_epochs` for the commands that run a hyper-search before training.
    `defaults`: the command's own changes to TrainConfig's defaults, below a --recipe's values."""
    from ...data import DATASETS
    from .data_args import add_data_arguments, add_recipe_argument

    unknown = set(defaults or {}) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"not TrainConfig settings: {', '.join(sorted(unknown))}")
    own = {**DEFAULTS, **(defaults or {})}
    p.set_defaults(_command_defaults=dict(defaults or {}))
    add_recipe_argument(p)
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help=f"{own['dataset']} (default; digits: embedded), cifar10, cifar100, folder (ImageFolder train/ val/), mnist or "
                        "fashion-mnist (IDX files; fashion-mnist defaults to /usr/share/datasets/fashion-mnist)")
    g.add_argument("--data-dir", default=None, help="dataset root (cifar10/cifar100/folder/mnist/fashion-mnist)")
    g.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: 16 digits, 28 mnist/fashion-mnist, 32 otherwise)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on a fixed, class-balanced subset of N training images (the test split is whole)")
    g.add_argument("--arch", default=None, help=f"model name (default {own['arch']}; see `repopt train "
                                                "--list-archs`), or timm:NAME for a timm model built fresh and made "
                                                "plain by repopt.to_target (docs/timm.md)")
    g.add_argument("--force-reinit", action="store_true", help="apply RepOpt's rule of initialization even where "
                   "the model's BatchNorms look trained (running statistics moved)")
    add_data_arguments(g)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {own['epochs']})")
    if hs_epochs:
        g.add_argument("--hs-epochs", type=int, default=None, help="hyper-search epochs (default: --epochs)")
    g.add_argument("--batch-size", type=int, default=None, help=f"global batch per optimizer step (default {own['batch_size']})")
    g.add_argument("--lr-base", type=float, default=None,
                   help="peak learning rate per --lr-base-size images, scaled to the global batch as the paper does "
                        "(default: sgd 0.1 per 256, linear; adamw 4e-3 and lion 4e-4 per 256, sqrt)")
    g.add_argument("--lr-base-size", type=int, default=None, help=f"the batch size --lr-base is given for "
                                                                             f"({own['lr_base_size']})")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute peak learning rate; overrides --lr-base (default: from --lr-base)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: sgd 4e-5 (the paper), adamw 0.05, lion 0.5")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup before the cosine decay (default: the first 5/120 of the run, the paper's "
                        "ImageNet proportion)")
    g.add_argument("--label-smoothing", type=float, default=None, help=f"default {own['label_smoothing']}")
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--ema", type=float, default=None, help="evaluate an EMA of the weights with this decay")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="test every N epochs and after the last (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--out", default=out_default, help=f"output directory (default {out_default}); re-running "
                                                       f"the same command resumes there")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args, method: str, out: str, epochs: int | None = None, **overrides) -> TrainConfig:
    """The run's TrainConfig: the --recipe preset (if any), then every flag given explicitly, then the command's
    own defaults (`defaults=` of add_training_arguments), then TrainConfig's.
    `method` is the command's own (explicit unless the command has a --method flag, whose value is then explicit
    only when given); `overrides` are explicit unless None."""
    from ..recipes import merge_preset
    from .data_args import data_options

    given = {k: getattr(args, k) for k in ("arch", "dataset", "data_dir", "image_size", "batch_size", "lr", "lr_base",
                                           "lr_base_size", "weight_decay", "warmup_epochs", "label_smoothing")
             if getattr(args, k) is not None}
    if epochs is not None or args.epochs is not None:
        given["epochs"] = args.epochs if epochs is None else epochs
    method_flag = getattr(args, "method", "not a flag")
    if method_flag == "not a flag" or method_flag is not None:
        given["method"] = method if method_flag == "not a flag" else method_flag
    if getattr(args, "optimizer", None) is not None:
        given["optimizer"] = args.optimizer
    given.update({k: v for k, v in overrides.items() if v is not None})
    options = data_options(args)
    if options:
        given["data_options"] = options
    settings, overridden = merge_preset(args.recipe, given)
    defaults = {"method": method, **args._command_defaults}  # the rest: TrainConfig's own
    defaulted = [k for k in ("arch", "dataset", "epochs", "batch_size") if k not in settings]  # nor a recipe's
    settings = {**{k: v for k, v in defaults.items() if k not in settings}, **settings}
    cfg = TrainConfig(out=out, train_subset=args.train_subset, accumulate=args.accumulate, amp=args.amp,
                       channels_last=args.channels_last, ema=args.ema, eval_every=args.eval_every, seed=args.seed,
                       device=args.device, quiet=args.quiet, recipe=args.recipe, recipe_overrides=sorted(overridden),
                       force_reinit=args.force_reinit, **settings)
    announce_settings(args, cfg, defaulted)
    return cfg


def announce_settings(args, cfg: TrainConfig, defaulted: list[str]) -> None:
    """One line at the start of `train`, `search` and `pipeline`: what the run uses, and which of it are defaults
    (the settings a newcomer did not choose; a pipeline's scales fit a `train` of the same --arch)."""
    import os

    if cfg.quiet or getattr(args, "json", False) or os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks
        return
    shown = {"arch": cfg.arch, "dataset": cfg.dataset, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
    text = ", ".join(f"{k.replace('_', ' ')} {v}" + (" (default)" if k in defaulted else "") for k, v in shown.items())
    recipe = f", recipe {cfg.recipe}" if cfg.recipe else ""
    print(f"[{args.command}] {text}{recipe}, seed {cfg.seed} -> {cfg.out}", flush=True)


def hs_epochs_of(args, cfg: TrainConfig) -> int:
    """--hs-epochs, by default the run's epochs (--epochs, else its recipe's): what the help of `train` and `pipeline`
    says."""
    from ..cli import at_least_one

    return cfg.epochs if args.hs_epochs is None else at_least_one(args.hs_epochs, "--hs-epochs")


def model_table() -> str:
    """`repopt train --list-archs`: every registered model with its metadata (models/registry.py), then timm."""
    from ...models.registry import list_models, model_info

    rows = [("name", "image", "modes", "released scales", "paper top-1", "")]
    for name in list_models():
        info = model_info(name)
        paper = f"{info.paper_top1:.2f}%" if info.paper_top1 is not None else "-"
        rows.append((name, str(info.image_size), ",".join(info.modes), info.scales_file or "-", paper,
                     info.description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows]
    sources = sorted({model_info(n).paper_source for n in list_models() if model_info(n).paper_source})
    return "\n".join([*(line.rstrip() for line in lines),
                      *(f"paper top-1: ImageNet, RepOpt training, from {s}" for s in sources),
                      "timm:NAME    any timm model (needs timm; docs/timm.md)"])

