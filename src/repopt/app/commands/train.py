"""`repopt train`: train one model (repopt, repvgg, plain or the hyper-search model)."""
from __future__ import annotations

import json

NAME = "train"
HELP = "Train a model: RepOpt (plain target + RepOpt optimizer), the RepVGG or plain baseline, or the HS model."
EXAMPLES = """examples:
  repopt train --method repopt --epochs 30 --out runs/repopt      # searches scales first (OUT/search), then trains
  repopt train --method repopt --scales RepOpt-VGG-B1.safetensors --arch repopt_vgg_b1 --dataset folder \\
      --data-dir /data/imagenet --image-size 224 --batch-size 256 --epochs 120
  repopt train --method repvgg --dataset cifar10 --data-dir ~/data --out runs/repvgg
  torchrun --standalone --nproc_per_node=2 -m repopt train --method plain --out runs/plain-ddp   # a free port
  torchrun --nproc_per_node=8 -m repopt train --recipe imagenet-repopt-vgg-b1 --scales RepOpt-VGG-B1-scales.pth \\
      --dataset folder --data-dir /imagenet --out runs/b1      # the paper's ImageNet recipe, streamed folder
  repopt train --method repopt --scales runs/search/scales.safetensors --no-reinit   # ablation: masks only
  repopt train --method repopt --init-from runs/pretrain --scales runs/pretrain/search/scales.safetensors \\
      --recipe finetune --train-subset 1000 --out runs/finetune   # fine-tune trained weights: masks only
Re-running the same command with the same --out resumes from the last checkpoint.
"""


def add_arguments(p) -> None:
    from ..ablations import add_ablation_arguments
    from .data_args import add_classes_argument
    from ..train import METHODS, OPTIMIZERS
    from .common import add_training_arguments

    p.add_argument("--method", default=None, choices=METHODS, help="default repopt (or the --recipe's)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--scales", default=None, help="scales file (safetensors or a released .pth) for --method "
                                                  "repopt, or 'ones' (every scale 1, no search; an ablation); "
                                                  "without it the hyper-search runs first")
    p.add_argument("--identity-init", default="searched", choices=["searched", "one"],
                   help="rule of initialization: searched identity scale (default) or 1 (the paper's formula)")
    p.add_argument("--grad-clip", type=float, default=None, help="global-norm gradient clipping (refused with "
                                                                 "repopt: it breaks the equivalence)")
    add_init_from_argument(p)
    add_classes_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--list-archs", action="store_true", help="list the model names and exit")
    add_training_arguments(p, "runs/train")
    add_ablation_arguments(p)


INIT_FROM_HELP = ("start from trained weights: a repopt run directory or model file, a reference RepOpt-VGG .pth, a "
                  "multi-branch RepVGG-style state dict (fused into the plain model; timm's for timm:NAME) or any "
                  "state dict with the model's keys (weights-only). A classifier of another size is replaced by a "
                  "fresh one. With --method repopt no rule of initialization is applied: the scales (--scales, or "
                  "the search) act as gradient multipliers only. --method repvgg needs multi-branch weights (a fused "
                  "conv cannot be split back into branches)")


def add_init_from_argument(p, extra: str = "") -> None:
    p.add_argument("--init-from", default=None, metavar="PATH", help=INIT_FROM_HELP + extra)


def run(args) -> int:
    from ..runs import train_repopt
    from .common import config_from_args, hs_epochs_of, model_table

    if args.list_archs:
        print(model_table())
        return 0
    cfg = config_from_args(args, "repopt", args.out, scales=args.scales, identity_init=args.identity_init,
                           grad_clip=args.grad_clip, reinit=not args.no_reinit, mask=not args.no_mask,
                           init_from=args.init_from, classes=args.classes)
    result = train_repopt(cfg, hs_epochs_of(args, cfg))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        skipped = f"; {result['skipped_steps']} steps skipped by the AMP GradScaler (inf/NaN gradients)" \
            if result.get("skipped_steps") else ""
        print(f"{result['method']}: top-1 {result['top1']:.2f}% after {result['epochs']} epochs "
              f"({result['train_images_per_s']:.0f} images/s); weights in {result['out']}/model.safetensors{skipped}")
    return 0
