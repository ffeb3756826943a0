"""`repopt pipeline`: the whole flow on one dataset, with a report."""
from __future__ import annotations

NAME = "pipeline"
HELP = ("Hyper-search, then train RepOpt, RepVGG and plain with the same budget, evaluate, quantize to INT8 and "
        "write OUT/report.{json,md} and plots.")
EXAMPLES = """examples:
  repopt pipeline                                   # the demo: embedded digits, repopt_vgg_a0, 6 epochs, ~3 min
  repopt pipeline --dataset fashion-mnist --train-subset 10000 --epochs 5 --out runs/fmnist   # Debian's package
  repopt pipeline --dataset cifar10 --data-dir ~/data --arch repopt_vgg_small --epochs 40 --out runs/cifar10
  repopt pipeline --int8-backend onnxruntime        # also writes runs/pipeline/<method>/model.int8.onnx
Re-running the same command resumes: finished stages are skipped, a stopped one continues from its checkpoint.
"""

# The demo (no arguments): TrainConfig's defaults (repopt_vgg_a0, a 22-layer plain net, where the plain baseline lags
# and RepOpt matches RepVGG; the embedded digits), with the pipeline's one change: 6 epochs (four trainings: search and
# three rows) keep it within a few minutes on a 2-core CPU (docs/results.md, section "The demo").
DEFAULTS = {"epochs": 6}


def add_arguments(p) -> None:
    from ..ablations import add_ablation_arguments
    from ..train import OPTIMIZERS
    from .common import add_training_arguments

    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 column")
    p.add_argument("--int8-backend", default="torchao", choices=["torchao", "onnxruntime"],
                   help="INT8 column from torchao PT2E (default) or onnxruntime, which also writes "
                        "OUT/<method>/model.int8.onnx")
    p.add_argument("--scales", default=None, help="use this scales file for the repopt row instead of searching "
                                                  "(e.g. one searched on another dataset), or 'ones' (no search)")
    from .data_args import add_classes_argument
    from .train import add_init_from_argument

    add_init_from_argument(p, "; here for every row (a repvgg row from plain weights is left out, in one line), "
                              "while the hyper-search starts from scratch: its branch scales are what it searches, "
                              "and the paper's scales transfer across datasets (its Table 5)")
    add_classes_argument(p)
    p.add_argument("--json", action="store_true", help="print report.json instead of the table")
    add_training_arguments(p, "runs/pipeline", defaults=DEFAULTS)
    add_ablation_arguments(p)


def run(args) -> int:
    import json

    from ..pipeline import report_markdown, run_pipeline
    from .common import config_from_args, hs_epochs_of

    base = config_from_args(args, "repopt", args.out, reinit=not args.no_reinit, mask=not args.no_mask,
                            init_from=args.init_from, classes=args.classes)
    report = run_pipeline(base, hs_epochs_of(args, base), int8=not args.no_int8, int8_backend=args.int8_backend,
                          scales=args.scales)
    print(json.dumps(report, indent=2) if args.json else report_markdown(report))
    if not args.json:
        print(f"written: {args.out}/report.json, {args.out}/report.md, {args.out}/curves.png")
    return 0
