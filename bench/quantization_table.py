"""The INT8 table of docs/quantization.md, from the runs of one `repopt pipeline` output folder.

It runs, in this process, exactly the commands it prints (`repopt quantize ... --json` per run, per-channel and
per-tensor, optionally with QAT; `repopt analyze ... --plot`), keeps their JSON in OUT/quantization-NAME.json and
prints the markdown tables. Nothing here measures anything the commands do not print.

    repopt pipeline --arch repopt_vgg_tiny --out runs/q --epochs 12 --hs-epochs 12
    python bench/quantization_table.py runs/q --name digits --qat-epochs 1 --threads 1 --out runs/q

A CIFAR-format smoke run without internet (random images in the real pickle format; not an accuracy claim):

    python bench/quantization_table.py --write-synthetic-cifar data/synth --per-file 200
    repopt pipeline --arch repopt_vgg_tiny --dataset cifar10 --data-dir data/synth --epochs 2 --hs-epochs 2 --out runs/synth
    python bench/quantization_table.py runs/synth --name synthetic-cifar10 --threads 1 --out runs/synth
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from cli_json import repopt_json
from repopt._io import write_json

METHODS = ("repopt", "repvgg", "plain")


def measure(runs: Path, methods, qat_epochs: int, calib_batches: int, threads: int | None, plot: Path) -> dict:
    results = {"commands": [], "quantize": {}, "load_average_before": os.getloadavg()}
    for method in methods:
        run = str(runs / method)
        common = ["--calib-batches", str(calib_batches)] + (["--threads", str(threads)] if threads else [])
        per_channel = ["quantize", run, *common]
        if qat_epochs:
            per_channel += ["--qat-epochs", str(qat_epochs)]
        per_tensor = ["quantize", run, *common, "--per-tensor"]
        results["quantize"][method] = {"per_channel": repopt_json(per_channel),
                                       "per_tensor": repopt_json(per_tensor)}
        results["commands"] += [per_channel, per_tensor]
    analyze = ["analyze", *(str(runs / m) for m in methods), "--plot", str(plot)]
    results["analyze"] = repopt_json(analyze)
    results["commands"].append(analyze)
    results["load_average_after"] = os.getloadavg()
    return results


def accuracy_table(res: dict) -> str:
    qat = any("qat_int8_top1" in r["per_channel"] for r in res["quantize"].values())
    head = ["method", "fp32 top-1", "int8 per-channel top-1 (drop)", "logit SQNR dB", "int8 per-tensor top-1 (drop)",
            "logit SQNR dB"] + (["int8 QAT top-1", "logit SQNR dB"] if qat else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in res["quantize"].items():
        pc, pt = r["per_channel"], r["per_tensor"]
        cells = [method, f"{pc['fp32_top1']:.2f}"]
        for q in (pc, pt):
            cells += [f"{q['int8_top1']:.2f} ({q['int8_top1'] - q['fp32_top1']:+.2f})", f"{q['int8_logit_sqnr_db']:.1f}"]
        if qat:
            cells += [f"{pc['qat_int8_top1']:.2f}", f"{pc['qat_int8_logit_sqnr_db']:.1f}"] if "qat_int8_top1" in pc \
                else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(res: dict) -> str:
    head = ("| method | settings | fp32 ms/batch (median / min) | int8 ms/batch (median / min) | speed-up (median) | "
            "batch | threads | load avg (1 min) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for method, r in res["quantize"].items():
        for key in ("per_channel", "per_tensor"):
            q = r[key]
            t = q["timing"]
            lines.append(f"| {method} | {key.replace('_', '-')} | {q['fp32_ms_per_batch']:.2f} / {t['fp32_min_ms']:.2f} | "
                         f"{q['int8_ms_per_batch']:.2f} / {t['int8_min_ms']:.2f} | "
                         f"{q['fp32_ms_per_batch'] / q['int8_ms_per_batch']:.2f}x | "
                         f"{t['batch_size']} | {t['threads']} | {t['load_average_1min']:.2f} |")
    return "\n".join(lines)


def kernel_table(res: dict) -> str:
    runs = res["analyze"]["runs"]
    names = [row["name"] for row in runs[0]["layers"]]
    head = ["layer", "shape"] + [f"{r['label']} {col}" for r in runs for col in ("std", "centre", "surround")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, name in enumerate(names):
        cells = [name, "x".join(map(str, runs[0]["layers"][i]["shape"]))]
        for r in runs:
            row = r["layers"][i]
            cells += [f"{row['std']:.4f}", f"{row['std_centre']:.4f}", f"{row['std_surround']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| run | mean std | mean centre std | mean surrounding std | centre / surround | max abs |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        lines.append(f"| {r['label']} | {s['mean_std']:.4f} | {s['mean_std_centre']:.4f} | "
                     f"{s['mean_std_surround']:.4f} | {s['centre_over_surround']:.2f} | {s['max_abs']:.3f} |")
    return "\n".join(lines)


def settings_line(res: dict) -> str:
    s = next(iter(res["quantize"].values()))["per_channel"]["settings"]
    return (f"{s['quantizer']}; weights {s['weights']}, activations {s['activations']}, "
            f"{s['activation_observer']} observer, reduce_range={s['reduce_range']} (cpu_vnni={s['cpu_vnni']}), "
            f"{s['images_seen']} calibration images in batches of {s['int8_batch_size']}; torch {s['torch']}, "
            f"torchao {s['torchao']}")


def write_synthetic_cifar(root: Path, per_file: int) -> None:
    """Random images and labels in torchvision's CIFAR-10 pickle layout (tests/formats.py writes the real format)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from formats import write_cifar

    write_cifar(root, "cifar10", style="py2", per_file=per_file, seed=0)
    print(f"wrote {root}/cifar-10-batches-py: {5 * per_file} train and {per_file} test random images "
          f"(synthetic: accuracy on it means nothing)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="?", type=Path, help="a `repopt pipeline` output folder (with repopt/ repvgg/ plain/)")
    p.add_argument("--name", default="digits", help="label for the output files (default digits)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON and the PNG (default .)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--qat-epochs", type=int, default=0, help="add a QAT column (per-channel), default 0")
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads while timing (1 on a shared CPU)")
    p.add_argument("--write-synthetic-cifar", type=Path, metavar="ROOT", help="only write synthetic CIFAR-10 files")
    p.add_argument("--per-file", type=int, default=200, help="images per synthetic CIFAR file (default 200)")
    args = p.parse_args(argv)
    if args.write_synthetic_cifar:
        write_synthetic_cifar(args.write_synthetic_cifar, args.per_file)
        return 0
    if args.runs is None:
        p.error("give a pipeline output folder (or --write-synthetic-cifar ROOT)")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    res = measure(args.runs, args.methods, args.qat_epochs, args.calib_batches, args.threads,
                  args.out / f"kernels-{args.name}.png")
    res["seconds"] = time.time() - start
    write_json(args.out / f"quantization-{args.name}.json", res)
    print(f"## {args.name}\n\nSettings: {settings_line(res)}\n")
    print(accuracy_table(res), "\n")
    print(latency_table(res), "\n")
    print(kernel_table(res), "\n")
    print("Commands:\n\n```\n" + "\n".join("repopt " + shlex.join(c + ["--json"]) for c in res["commands"]) + "\n```")
    print(f"\nload average before {res['load_average_before']}, after {res['load_average_after']}; "
          f"{res['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
