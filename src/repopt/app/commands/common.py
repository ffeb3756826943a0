"""Arguments shared by `repopt train`, `search` and `pipeline`, and their translation into a TrainConfig."""
from __future__ import annotations

from ..train import TrainConfig


def add_training_arguments(p, out_default: str, epochs_default: int = 30) -> None:
    from ...data import DATASETS

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits (embedded, default), cifar10, cifar100 or folder (ImageFolder train/ val/)")
    g.add_argument("--data-dir", default=None, help="dataset root (cifar10/cifar100/folder)")
    g.add_argument("--image-size", type=int, default=None, help="input size in pixels (default 32)")
    g.add_argument("--arch", default="repopt_vgg_tiny", help="model name (see `repopt train --list-archs`)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs_default)
    g.add_argument("--hs-epochs", type=int, default=None, help="hyper-search epochs (default: --epochs)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch per optimizer step (default 64)")
    g.add_argument("--lr-base", type=float, default=None,
                   help="peak learning rate per --lr-base-size images, scaled to the global batch as the paper does "
                        "(default: sgd 0.1 per 256, linear; adamw 4e-3 and lion 4e-4 per 256, sqrt)")
    g.add_argument("--lr-base-size", type=int, default=256, help="the batch size --lr-base is given for (256)")
    g.add_argument("--lr", type=float, default=None,
                   help="absolute peak learning rate; overrides --lr-base (default: from --lr-base)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: sgd 4e-5 (the paper), adamw 0.05, lion 0.5")
    g.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warmup before the cosine decay (default: the first 5/120 of the run, the paper's "
                        "ImageNet proportion)")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--ema", type=float, default=None, help="evaluate an EMA of the weights with this decay")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--out", default=out_default, help=f"output directory (default {out_default}); re-running "
                                                       f"the same command resumes there")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def config_from_args(args, method: str, out: str, epochs: int | None = None, **overrides) -> TrainConfig:
    cfg = TrainConfig(method=method, arch=args.arch, dataset=args.dataset, data_dir=args.data_dir,
                      image_size=args.image_size, optimizer=getattr(args, "optimizer", "sgd"),
                      epochs=args.epochs if epochs is None else epochs, batch_size=args.batch_size, lr=args.lr,
                      lr_base=args.lr_base, lr_base_size=args.lr_base_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, accumulate=args.accumulate, amp=args.amp,
                      channels_last=args.channels_last, ema=args.ema, seed=args.seed, device=args.device, out=out,
                      quiet=args.quiet)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg
