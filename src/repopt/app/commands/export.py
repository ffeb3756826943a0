"""`repopt export`: the deployed plain network as ONNX, optionally checked against PyTorch with onnxruntime."""
from __future__ import annotations

import json

NAME = "export"
HELP = "Export the deployed plain network (BN folded, RepVGG fused) of a trained run to ONNX."
EXAMPLES = """examples:
  repopt export runs/pipeline/repopt -o repopt.onnx --check
  repopt export runs/pipeline/repvgg -o repvgg.onnx --opset 18 --json

The file has one input "input" (N, 3, S, S) with a dynamic batch N, normalized as in training, and one output
"logits". --check runs it with onnxruntime on random inputs and prints the largest absolute difference from PyTorch.
Needs the `export` extra: pip install 'repopt[export]'.
"""


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="run directory, model.safetensors or checkpoint.pt")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch; exit 1 above --tolerance")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted abs difference (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    import os
    from pathlib import Path

    import torch

    from ..cli import UserError
    from ...data import DEFAULT_IMAGE_SIZE
    from ...quant import MissingExtraError, check_onnx, export_onnx
    from .quantize import load_deployed

    folder = Path(args.output).resolve().parent
    if not folder.is_dir():
        raise UserError(f"cannot write {args.output}: the folder {folder} does not exist")
    model, cfg = load_deployed(args.checkpoint)
    size = cfg.get("image_size") or DEFAULT_IMAGE_SIZE.get(cfg["dataset"], 32)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=g)
    out = {"checkpoint": str(args.checkpoint), "method": cfg["method"], "arch": cfg["arch"], "output": args.output,
           "input_shape": ["N", 3, size, size]}
    try:
        if args.check:  # before writing anything: a check that cannot run should not leave a half-done job
            from ...quant._extras import require
            from ...quant.export import ExportDependencyError

            require("onnxruntime", "export", "Checking an ONNX file (--check)", ExportDependencyError)
        export_onnx(model, example, args.output, fold=False, opset=args.opset)
        out["bytes"] = os.path.getsize(args.output)
        if args.check:
            # a batch size other than the traced one also exercises the dynamic batch dimension
            probe = torch.randn(5, 3, size, size, generator=g)
            out["max_abs_diff"] = check_onnx(args.output, model, probe)
            out["check_ok"] = out["max_abs_diff"] <= args.tolerance
    except MissingExtraError as e:
        raise UserError(str(e)) from None
    ok = out.get("check_ok", True)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{cfg['method']} {cfg['arch']}: wrote {args.output} ({out['bytes'] / 1e6:.2f} MB, input N x 3 x "
              f"{size} x {size})")
        if args.check:
            print(f"onnxruntime vs PyTorch on 5 random inputs: max abs diff {out['max_abs_diff']:.2e} "
                  f"({'ok' if ok else 'ABOVE'} tolerance {args.tolerance:g})")
    return 0 if ok else 1
