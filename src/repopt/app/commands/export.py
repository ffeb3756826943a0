"""`repopt export`: the deployed plain network as ONNX (fp32, optionally checked against PyTorch with onnxruntime),
or quantized to INT8 with onnxruntime's static quantization and checked on the test set."""
from __future__ import annotations

import json

NAME = "export"
HELP = ("Export the deployed plain network (BN folded, RepVGG fused) of a trained run to ONNX, in fp32 or (--int8) "
        "quantized to INT8 with onnxruntime.")
EXAMPLES = """examples:
  repopt export runs/pipeline/repopt -o repopt.onnx --check
  repopt export runs/pipeline/repvgg -o repvgg.onnx --opset 18 --json
  repopt export runs/pipeline/repopt --int8 -o repopt.int8.onnx                 # per-channel, 32 calibration batches
  repopt export runs/pipeline/repopt --int8 -o repopt.int8.onnx --per-tensor --calib-batches 8 --threads 2

The file has one input "input" (N, 3, S, S) with a dynamic batch N, normalized as in training (per-channel mean and
std of the training images), and one output "logits". Its metadata_props mark it as a repopt classifier and hold the
training config, so `repopt eval FILE.onnx` can evaluate it. --check runs the fp32 file with onnxruntime on random
inputs and prints the largest absolute difference from PyTorch.

--int8: the fp32 ONNX model is quantized by onnxruntime (quant_pre_process, then quantize_static in QDQ format:
int8 symmetric weights, uint8 activations, static ranges from --calib-batches unaugmented training images of the
run's dataset). The INT8 file is then run on the test set against the fp32 ONNX model (top-1, agreement, logit SQNR)
and both are timed at batch 1 and --batch-size (median of alternating runs, --threads onnxruntime threads).
Everything is written to FILE.json beside the file. Nothing is written unless every step succeeds.
Needs the `export` extra: pip install 'repopt[export]'.
"""


def add_arguments(p) -> None:
    from ...data import DATASETS
    from ...quant.onnx_int8 import CALIBRATION_METHODS

    p.add_argument("checkpoint", help="run directory (with a finished model), model.safetensors or checkpoint.pt")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch; exit 1 above --tolerance")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted abs difference (default 1e-4)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    g = p.add_argument_group("INT8 (onnxruntime static quantization)")
    g.add_argument("--int8", action="store_true", help="write the INT8 (QDQ) model, checked on the test set")
    g.add_argument("--calib-batches", type=int, default=32, help="calibration batches of training images (32)")
    g.add_argument("--batch-size", type=int, default=64, help="images per calibration, test and timing batch (64)")
    g.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor, not per output channel")
    g.add_argument("--calib-method", default="minmax", choices=CALIBRATION_METHODS,
                   help="how activation ranges are set from the calibration data (default minmax)")
    g.add_argument("--dataset", default=None, choices=DATASETS,
                   help="calibration and test data (default: the run's own dataset)")
    g.add_argument("--data-dir", default=None, help="default: the run's data directory")
    g.add_argument("--threads", type=int, default=1,
                   help="onnxruntime threads for the check and the timing (default 1; 0 = onnxruntime's default)")
    g.add_argument("--repeats", type=int, default=30, help="timed runs per model and batch size (default 30)")


def _check_int8_args(args) -> None:
    from ..cli import UserError

    from ..cli import at_least_one

    for flag, value in (("--calib-batches", args.calib_batches), ("--batch-size", args.batch_size),
                        ("--repeats", args.repeats)):
        at_least_one(value, flag)
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (onnxruntime's default) or more, got {args.threads}")
    if args.check:
        raise UserError("--check compares an fp32 file with PyTorch; --int8 checks itself on the test set instead")


def run(args) -> int:
    from ..._io import check_writable

    check_writable(args.output)  # before minutes of work: a missing folder fails now, not at the end
    if args.int8:
        return _run_int8(args)
    import os

    import torch

    from ..cli import UserError
    from ..deploy import classifier_metadata, finished_model, user_errors
    from ...data import DEFAULT_IMAGE_SIZE
    from ...quant import MissingExtraError, check_onnx, export_onnx
    from .quantize import load_deployed

    model, cfg = load_deployed(finished_model(args.checkpoint))
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
        meta = classifier_metadata(cfg, "fp32", {"repopt.input": {"name": "input", "shape": out["input_shape"]}})
        export_onnx(model, example, args.output, fold=False, opset=args.opset, metadata=meta)
        out["bytes"] = os.path.getsize(args.output)
        if args.check:
            # a batch size other than the traced one also exercises the dynamic batch dimension
            probe = torch.randn(5, 3, size, size, generator=g)
            with user_errors():
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


def _run_int8(args) -> int:
    from ..deploy import export_int8, settings_path, user_errors
    from ...quant import OnnxQuantSettings
    from ...quant._extras import require
    from ...quant.export import ExportDependencyError

    _check_int8_args(args)
    settings = OnnxQuantSettings(per_channel=not args.per_tensor, calib_batches=args.calib_batches,
                                 calibrate_method=args.calib_method)
    with user_errors():
        for module in ("onnx", "onnxscript", "onnxruntime"):  # before any work: say what is missing first
            require(module, "export", "INT8 ONNX export (--int8)", ExportDependencyError)
        out = export_int8(args.checkpoint, args.output, settings=settings, dataset=args.dataset,
                          data_dir=args.data_dir, batch_size=args.batch_size, threads=args.threads or None,
                          repeats=args.repeats, opset=args.opset)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    src, s, t, lat = out["source"], out["settings"], out["test"], out["latency"]
    print(f"{src['method']} {src['arch']}: wrote {args.output} ({out['bytes'] / 1e6:.2f} MB, INT8 QDQ; fp32 ONNX "
          f"{out['fp32_bytes'] / 1e6:.2f} MB), input {' x '.join(map(str, out['input']['shape']))}")
    print(f"  {'per-channel' if s['per_channel'] else 'per-tensor'} int8 weights, {s['activations']} activations, "
          f"{s['calibrate_method']} ranges from {out['calibration']['images']} {out['calibration']['dataset']} "
          f"training images, reduce_range={s['reduce_range']}")
    print(f"  test set ({t['images']} images, onnxruntime): fp32 top-1 {t['fp32_top1']:.2f}%   INT8 top-1 "
          f"{t['int8_top1']:.2f}%   same class as fp32 {t['int8_agreement']:.2f}%   logit SQNR "
          f"{t['int8_logit_sqnr_db']:.1f} dB")
    load = lat["load_average_1min"]
    print(f"  latency, onnxruntime CPU, {lat['threads']} thread(s), median of {lat['repeats']} alternating runs"
          + (f", load average {load:.2f} on {lat['cpus']} CPUs:" if load is not None else ":"))
    for key in sorted((k for k in lat if k.startswith("batch_")), key=lambda k: lat[k]["batch"]):
        b = lat[key]
        print(f"    batch {b['batch']:>3}: fp32 {b['fp32_ms']:8.3f} ms   INT8 {b['int8_ms']:8.3f} ms   "
              f"INT8 / fp32 {b['int8_over_fp32']:.2f}   (fastest runs: {b['fp32_min_ms']:.3f} / "
              f"{b['int8_min_ms']:.3f} ms, ratio {b['int8_over_fp32_of_minima']:.2f})")
    print(f"  settings: {settings_path(args.output)}")
    return 0
