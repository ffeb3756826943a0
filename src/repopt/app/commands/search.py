"""`repopt search`: train the hyper-search model and write its scales file."""
from __future__ import annotations

import json

NAME = "search"
HELP = "Hyper-search: train the HS model (trainable branch scales) and write the scales file for RepOpt."
EXAMPLES = """examples:
  repopt search --epochs 30 --out runs/search                      # embedded digits, repopt_vgg_a0
  repopt search --dataset cifar100 --data-dir ~/data --arch repopt_vgg_b1 --epochs 240 -o b1.safetensors
The scales file is OUT/scales.safetensors (and a copy at -o/--output when given).
"""


def add_arguments(p) -> None:
    from .common import add_training_arguments
    from .data_args import add_classes_argument

    p.add_argument("-o", "--output", default=None, help="also copy the scales file here")
    p.add_argument("--json", action="store_true")
    add_classes_argument(p)
    add_training_arguments(p, "runs/search", hs_epochs=False)  # --epochs are the search's own


def run(args) -> int:
    from ..._io import check_writable, copy_file
    from ..runs import HS_GRAD_CLIP, search_scales
    from .common import config_from_args

    if args.output:
        check_writable(args.output)  # before the search, not after it
    cfg = config_from_args(args, "hs", args.out, grad_clip=HS_GRAD_CLIP, classes=args.classes)
    scales, result = search_scales(cfg)
    if args.output:
        scales = copy_file(scales, args.output)
    if args.json:
        print(json.dumps({**result, "scales": str(scales)}, indent=2))
    else:
        print(f"scales written to {scales} (HS top-1 {result['top1']:.2f}%: not a quality signal)")
    return 0
