"""`repopt quantize`: INT8 post-training quantization (and optionally QAT) of a trained run, with top-1 and latency
of the deployed fp32 network and of its int8 version side by side."""
from __future__ import annotations

import json
import math
import os
import statistics
import time

NAME = "quantize"
HELP = ("Quantize a trained model to INT8 on this CPU (torchao PT2E, x86 quantizer, lowered to oneDNN int8 kernels) "
        "and compare top-1 and latency with the deployed fp32 model.")
EXAMPLES = """examples:
  repopt quantize runs/pipeline/repopt                      # PTQ on the training dataset, 32 calibration batches
  repopt quantize runs/pipeline/repvgg --json               # RepVGG is fused first, then quantized
  repopt quantize runs/pipeline/repopt --qat-epochs 2       # also a short quantization-aware fine-tune
  repopt quantize runs/c10/repopt --dataset cifar10 --data-dir ~/data --per-tensor --observer minmax

The fp32 baseline is the deployed network (BN folded into the convs, RepVGG blocks fused), run eagerly. Latency is
the median of alternating fp32 / int8 forward passes on the same batch of --batch-size images. On a CPU shared with
other jobs use --threads 1: torch's threads wait for each other, and a descheduled one can make a pass 10-20x slower.
The test set also gives the logit SQNR (dB) of each int8 model against fp32: it shows quantization error even where
top-1 saturates.

--save FILE.pt2 writes the quantized program before lowering (int8 weights, reference quantize / dequantize ops),
with the training config; `repopt eval FILE.pt2` (or repopt.quant.load_int8_program) loads it in another process and
lowers it to oneDNN int8 kernels there. The lowered graph itself cannot be saved: it holds oneDNN packed weights
(opaque tensors) that torch.export.save refuses. For a file that runs outside PyTorch use `repopt export --int8`.
Needs the `quant` extra: pip install 'repopt[quant]'.
"""


def add_arguments(p) -> None:
    from ...data import DATASETS

    p.add_argument("checkpoint", help="run directory, model.safetensors or checkpoint.pt")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the training dataset")
    p.add_argument("--data-dir", default=None, help="default: the training data directory")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per calibration, evaluation, QAT and timing batch (default 64)")
    p.add_argument("--calib-batches", type=int, default=32,
                   help="calibration batches of training images, unaugmented (default 32)")
    p.add_argument("--per-tensor", action="store_true",
                   help="one weight scale per tensor instead of one per output channel")
    p.add_argument("--observer", default="histogram", choices=["histogram", "minmax"],
                   help="activation range observer for PTQ (default histogram, torchao's x86 default)")
    p.add_argument("--reduce-range", default="auto", choices=["auto", "on", "off"],
                   help="7-bit activations; auto = on when the CPU lacks VNNI (default auto)")
    p.add_argument("--qat-epochs", type=int, default=0, help="epochs of quantization-aware fine-tuning (default 0)")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="QAT learning rate, SGD momentum 0.9 (default 1e-4)")
    p.add_argument("--repeats", type=int, default=30, help="timed forward passes per model (default 30)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing (default: torch's choice)")
    p.add_argument("--save", default=None, metavar="FILE.pt2",
                   help="write the PTQ program (before lowering) here, to be reloaded with `repopt eval FILE.pt2`")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def load_deployed(path):
    """(plain deployed fp32 network in eval mode, training config): RepVGG fused, then every conv+BN folded."""
    from ..checkpoint import load_trained
    from ...quant import fold_batchnorm

    model, cfg = load_trained(path, deploy=True)
    return fold_batchnorm(model).eval(), cfg


def dataset_for(args, cfg):
    """The dataset named on the command line, else the one the run was trained on, at the run's image size."""
    from ..cli import UserError
    from ..checkpoint import run_data_options
    from ...data import load_dataset

    name = args.dataset or cfg["dataset"]
    data_dir = args.data_dir or (cfg.get("data_dir") if name == cfg["dataset"] else None)
    # calibrate on the images the run trained on (its training subset, if any)
    options = run_data_options(cfg) if name == cfg["dataset"] else {}
    ds = load_dataset(name, data_dir, cfg.get("image_size"), **options)
    if ds.num_classes != cfg["num_classes"]:
        raise UserError(f"the model has {cfg['num_classes']} classes but {name} has {ds.num_classes}")
    return ds


def paired_latency_ms(a, b, x, repeats: int, warmup: int = 3) -> tuple[list[float], list[float]]:
    """ms per forward pass of `a` and of `b` on `x`, `repeats` each, timed alternately so that both see the same
    machine load (other jobs on a shared CPU slow both, not one)."""
    import torch

    times_a, times_b = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            for model, times in ((a, times_a), (b, times_b)):
                t = time.perf_counter()
                model(x)
                if i >= warmup:
                    times.append(time.perf_counter() - t)
    return [1000 * t for t in times_a], [1000 * t for t in times_b]


def compare_on_test(fp32, int8_models: dict, batches) -> dict:
    """Top-1 of the fp32 model and of each int8 model, plus how close each int8 model stays to fp32: the share of
    test images with the same predicted class, and the SQNR of the logits in dB (10 log10 of signal power over
    quantization-error power). Top-1 on a small, easy test set saturates; the SQNR still shows the damage."""
    import torch

    correct = {"fp32": 0, **{k: 0 for k in int8_models}}
    agree = {k: 0 for k in int8_models}
    signal, noise = 0.0, {k: 0.0 for k in int8_models}
    total = 0
    with torch.no_grad():
        for x, y in batches:
            ref = fp32(x)
            pred = ref.argmax(1)
            correct["fp32"] += int((pred == y).sum())
            signal += float(ref.double().pow(2).sum())
            for k, m in int8_models.items():
                q = m(x)
                correct[k] += int((q.argmax(1) == y).sum())
                agree[k] += int((q.argmax(1) == pred).sum())
                noise[k] += float((q.double() - ref.double()).pow(2).sum())
            total += y.numel()
    out = {f"{k}_top1": 100.0 * c / total for k, c in correct.items()}
    for k in int8_models:
        out[f"{k}_agreement"] = 100.0 * agree[k] / total
        out[f"{k}_logit_sqnr_db"] = 10 * math.log10(signal / noise[k]) if noise[k] > 0 else math.inf
    return out


class _Epochs:
    """Re-iterable training batches for QAT: each pass is the next epoch's shuffle and augmentation."""

    def __init__(self, ds, batch_size: int):
        self.ds, self.batch_size, self.epoch = ds, batch_size, 0

    def __len__(self) -> int:
        return self.ds.steps_per_epoch(self.batch_size)

    def __iter__(self):
        self.epoch += 1
        return iter(self.ds.train_batches(self.batch_size, epoch=self.epoch, seed=0))


def _settings(args):
    from ...quant import QuantSettings

    reduce = {"auto": None, "on": True, "off": False}[args.reduce_range]
    return QuantSettings(per_channel=not args.per_tensor, reduce_range=reduce, activation_observer=args.observer,
                         calib_batches=args.calib_batches, qat_epochs=max(args.qat_epochs, 1), qat_lr=args.qat_lr)


def _check(args) -> None:
    from ..cli import UserError

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--calib-batches", args.calib_batches, 1),
                             ("--repeats", args.repeats, 1), ("--qat-epochs", args.qat_epochs, 0),
                             ("--threads", args.threads or 1, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if not args.qat_lr > 0:
        raise UserError(f"--qat-lr must be > 0, got {args.qat_lr}")
    if args.save is not None:
        from pathlib import Path

        if Path(args.save).suffix != ".pt2":
            raise UserError(f"--save {args.save}: the file name must end in .pt2 (a torch.export archive)")
        from ..._io import check_writable

        check_writable(args.save)


def run(args) -> int:
    import torch

    from ..cli import UserError
    from ...quant import MissingExtraError, quantize_ptq, quantize_qat

    _check(args)
    model, cfg = load_deployed(args.checkpoint)
    ds = dataset_for(args, cfg)
    if ds.steps_per_epoch(args.batch_size) < 1:
        raise UserError(f"{ds.name} has {ds.num_train} training images, fewer than one batch of {args.batch_size}; "
                        f"lower --batch-size")
    settings = _settings(args)
    calib = ds.calibration_batches(args.calib_batches, args.batch_size)
    try:
        int8 = quantize_ptq(model, calib, settings)
        qat = quantize_qat(model, _Epochs(ds, args.batch_size), settings) if args.qat_epochs > 0 else None
    except MissingExtraError as e:
        raise UserError(str(e)) from None

    out = {"checkpoint": str(args.checkpoint), "method": cfg["method"], "arch": cfg["arch"], "dataset": ds.name,
           "test_images": ds.num_test}
    out.update(compare_on_test(model, {"int8": int8, **({"qat_int8": qat} if qat is not None else {})},
                               ds.test_batches(args.batch_size)))
    x = calib[0][0]  # a full batch: the int8 graph is specialised to it, so timing runs it without padding
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(args.threads or threads)
        fp32_ms, int8_ms = paired_latency_ms(model, int8, x, args.repeats)
        out["timing"] = {"batch_size": x.shape[0], "image_size": x.shape[-1], "threads": torch.get_num_threads(),
                         "cpus": os.cpu_count(), "repeats": args.repeats, "fp32": "eager, BN folded",
                         "fp32_min_ms": min(fp32_ms), "int8_min_ms": min(int8_ms),
                         "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    finally:
        torch.set_num_threads(threads)
    out["fp32_ms_per_batch"], out["int8_ms_per_batch"] = statistics.median(fp32_ms), statistics.median(int8_ms)
    out["settings"] = int8.report()
    if qat is not None:
        out["qat_settings"] = qat.report()
    if args.save is not None:
        from ...quant import save_int8_program

        save_int8_program(int8, args.save, {"config": cfg, "source": str(args.checkpoint), "calibration_dataset":
                                            ds.name, "test": {k: out[k] for k in ("fp32_top1", "int8_top1")}})
        out["saved"] = args.save
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    s, t = out["settings"], out["timing"]
    print(f"{cfg['method']} {cfg['arch']} on {ds.name} (test set, {ds.num_test} images)")
    print(f"  fp32 deployed  top-1 {out['fp32_top1']:6.2f}%   {out['fp32_ms_per_batch']:8.2f} ms/batch")
    print(f"  int8 PTQ       top-1 {out['int8_top1']:6.2f}%   {out['int8_ms_per_batch']:8.2f} ms/batch   "
          f"({out['fp32_ms_per_batch'] / out['int8_ms_per_batch']:.2f}x)   logit SQNR {out['int8_logit_sqnr_db']:.1f} dB, "
          f"same class as fp32 on {out['int8_agreement']:.2f}%")
    if qat is not None:
        print(f"  int8 QAT       top-1 {out['qat_int8_top1']:6.2f}%   ({args.qat_epochs} epochs, lr {args.qat_lr:g})   "
              f"logit SQNR {out['qat_int8_logit_sqnr_db']:.1f} dB")
    print(f"  {'per-channel' if s['per_channel'] else 'per-tensor'} weights, {s['activation_observer']} observer, "
          f"reduce_range={s['reduce_range']}, {s['images_seen']} calibration images")
    if args.save is not None:
        print(f"  saved the quantized program (before lowering) to {args.save}; `repopt eval {args.save}` reloads it")
    load = t["load_average_1min"]
    print(f"  timing: median of {args.repeats}, batch {x.shape[0]}, torch threads {t['threads']}"
          + (f", load average {load:.2f} on {t['cpus']} CPUs" if load is not None else ""))
    if load is not None and t["cpus"] and load > t["cpus"] and t["threads"] > 1:
        print("  (the CPU is oversubscribed: multi-threaded timings are unreliable, try --threads 1)")
    return 0
