"""`repopt eval`: top-1 of a trained model on a dataset."""
from __future__ import annotations

import json

NAME = "eval"
HELP = ("Evaluate a trained model (a run directory, its model.safetensors or checkpoint.pt) or a saved deployment "
        "file (.onnx from `repopt export`, .pt2 from `repopt quantize --save`) on a dataset.")
EXAMPLES = """examples:
  repopt eval runs/repopt                    # on the dataset it was trained on
  repopt eval runs/repvgg --deploy --json    # the fused (deployed) RepVGG
  repopt eval runs/repopt --dataset cifar10 --data-dir ~/data
  repopt eval repopt.int8.onnx               # an exported ONNX file (fp32 or INT8), run by onnxruntime
  repopt eval repopt.int8.pt2                # a saved PT2E INT8 program, lowered to oneDNN int8 on load (torchao)
"""


def add_arguments(p) -> None:
    from ...data import DATASETS

    p.add_argument("checkpoint", help="run directory, model.safetensors, checkpoint.pt, FILE.onnx or FILE.pt2")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the training dataset")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--deploy", action="store_true", help="evaluate the deployed form (RepVGG fused)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..deploy import is_deployed_file

    if is_deployed_file(args.checkpoint):
        return _run_file(args)
    from ..checkpoint import load_trained, run_data_options
    from ...data import load_dataset
    from ..train import evaluate, resolve_device

    model, cfg = load_trained(args.checkpoint, deploy=args.deploy)
    dataset = args.dataset or cfg["dataset"]
    data_dir = args.data_dir if args.dataset else cfg.get("data_dir")
    options = run_data_options(cfg) if dataset == cfg["dataset"] else {}
    ds = load_dataset(dataset, data_dir, cfg.get("image_size"), **options)
    if ds.num_classes != cfg["num_classes"]:
        from ..cli import UserError

        raise UserError(f"the model has {cfg['num_classes']} classes but {dataset} has {ds.num_classes}")
    device = resolve_device(args.device)
    top1, loss = evaluate(model.to(device), ds.test_batches(args.batch_size, device=device))
    out = {"checkpoint": args.checkpoint, "method": cfg["method"], "arch": cfg["arch"], "dataset": dataset,
           "top1": top1, "loss": loss, "deployed": args.deploy}
    print(json.dumps(out, indent=2) if args.json else f"{cfg['method']} {cfg['arch']} on {dataset}: top-1 "
          f"{top1:.2f}% (loss {loss:.4f})")
    return 0


def _run_file(args) -> int:
    from ..deploy import evaluate_file, user_errors

    with user_errors():
        out = evaluate_file(args.checkpoint, args.dataset, args.data_dir, args.batch_size)
    print(json.dumps(out, indent=2) if args.json else f"{out['method']} {out['arch']} ({out['precision']}, "
          f"{out['backend']}) on {out['dataset']}: top-1 {out['top1']:.2f}% (loss {out['loss']:.4f})")
    return 0
