"""fp32 -> INT8 in onnxruntime and torchao side by side, from `repopt pipeline` output folders (one per seed).

For every folder, every method (repopt / repvgg / plain) and both weight granularities it runs, in this process,
exactly the commands it prints:

    repopt export RUN --int8 -o OUT/NAME.int8.onnx [--per-tensor] --calib-batches N --threads T --json   # onnxruntime
    repopt quantize RUN [--per-tensor] --calib-batches N --threads T --json                             # torchao

keeps their JSON in OUT/int8-onnx-table.json and prints the markdown tables of docs/quantization.md: top-1 drop and
logit SQNR per backend (mean and standard error over the folders), paired differences between methods, and the
INT8 / fp32 latency ratio in onnxruntime at batch 1 and batch 64 (and torchao's at batch 64).

    repopt pipeline --arch repopt_vgg_a0 --epochs 20 --hs-epochs 20 --no-int8 --out runs/a0/s$S --seed $S   # S = 0..2
    python bench/int8_onnx_table.py runs/a0/s0 runs/a0/s1 runs/a0/s2 --threads 1 --out runs/a0/int8

Re-run it on any other set of pipeline folders (other dataset, deeper net): nothing here is specific to one.
How the latency ratio depends on the input size (one trained run's network, fed larger images):

    python bench/int8_onnx_table.py --latency-sweep runs/a0/s0/repopt --sizes 16 28 32 64 --threads 1 --out runs/sweep
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from cli_json import repopt_json

METHODS = ("repopt", "repvgg", "plain")
GRANULARITIES = ("per_channel", "per_tensor")


def measure(folders: list[Path], methods, calib_batches: int, threads: int, repeats: int, out: Path) -> list[dict]:
    rows = []
    for i, folder in enumerate(folders):
        for method in methods:
            run = folder / method
            common = ["--calib-batches", str(calib_batches), "--threads", str(threads), "--repeats", str(repeats)]
            for gran in GRANULARITIES:
                flag = ["--per-tensor"] if gran == "per_tensor" else []
                onnx_file = out / f"f{i}-{method}-{gran}.int8.onnx"
                load = os.getloadavg()[0]
                ort = repopt_json(["export", str(run), "--int8", "-o", str(onnx_file), *flag, *common])
                ao = repopt_json(["quantize", str(run), *flag, *common])
                rows.append({"folder": str(folder), "method": method, "granularity": gran, "onnxruntime": ort,
                             "torchao": ao, "load_average_before": load, "load_average_after": os.getloadavg()[0]})
    return rows


def _mean_se(values: list[float]) -> str:
    """mean ± standard error over folders (just the value for one folder); an infinite SQNR (int8 == fp32) is left
    out and counted."""
    finite = [v for v in values if math.isfinite(v)]
    note = f" ({len(values) - len(finite)} inf)" if len(finite) < len(values) else ""
    if not finite:
        return "inf" if values else "-"
    if len(finite) == 1:
        return f"{finite[0]:.2f}{note}"
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite) / len(finite) ** 0.5:.2f}{note}"


def _get(row: dict, backend: str) -> dict:
    """fp32 top-1, INT8 top-1, agreement and SQNR of one row for one backend, under common names."""
    if backend == "onnxruntime":
        t = row["onnxruntime"]["test"]
    else:
        t = row["torchao"]
    return {"fp32": t["fp32_top1"], "int8": t["int8_top1"], "drop": t["int8_top1"] - t["fp32_top1"],
            "agree": t["int8_agreement"], "sqnr": t["int8_logit_sqnr_db"]}


def accuracy_table(rows: list[dict], methods) -> str:
    head = ["method", "weights", "fp32 top-1", "onnxruntime INT8 top-1", "INT8 - fp32", "SQNR dB", "same class %",
            "torchao INT8 top-1", "INT8 - fp32", "SQNR dB", "same class %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        for gran in GRANULARITIES:
            sel = [r for r in rows if r["method"] == method and r["granularity"] == gran]
            if not sel:
                continue
            cells = [method, gran.replace("_", "-"), _mean_se([_get(r, "onnxruntime")["fp32"] for r in sel])]
            for backend in ("onnxruntime", "torchao"):
                vals = [_get(r, backend) for r in sel]
                cells += [_mean_se([v["int8"] for v in vals]), _mean_se([v["drop"] for v in vals]),
                          _mean_se([v["sqnr"] for v in vals]), _mean_se([v["agree"] for v in vals])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows: list[dict], methods) -> str:
    """repopt minus each other method, folder by folder (paired by seed): logit SQNR and INT8 - fp32 top-1."""
    if "repopt" not in methods:
        return ""
    lines = ["| repopt minus | backend | weights | SQNR dB, mean ± se | per folder | repopt higher | "
             "(INT8 - fp32 top-1), mean ± se | per folder |", "|---|---|---|---|---|---|---|---|"]
    folders = list(dict.fromkeys(r["folder"] for r in rows))
    for other in [m for m in methods if m != "repopt"]:
        for backend in ("onnxruntime", "torchao"):
            for gran in GRANULARITIES:
                diffs = {"sqnr": [], "drop": []}
                for folder in folders:
                    pick = {r["method"]: r for r in rows if r["folder"] == folder and r["granularity"] == gran}
                    if "repopt" in pick and other in pick:
                        for key in diffs:
                            diffs[key].append(_get(pick["repopt"], backend)[key] - _get(pick[other], backend)[key])
                if not diffs["sqnr"]:
                    continue
                d, t = diffs["sqnr"], diffs["drop"]
                lines.append(f"| {other} | {backend} | {gran.replace('_', '-')} | {_mean_se(d)} | "
                             f"{' / '.join(f'{x:+.2f}' for x in d)} | {sum(x > 0 for x in d)} of {len(d)} | "
                             f"{_mean_se(t)} | {' / '.join(f'{x:+.2f}' for x in t)} |")
    return "\n".join(lines)


def latency_table(rows: list[dict]) -> str:
    """INT8 / fp32 per batch size over all runs: the deployed networks of all methods have the same shape."""
    lines = ["| backend | batch | threads | fp32 ms | INT8 ms | INT8 / fp32 (range) | INT8 / fp32 of minima (range) "
             "| runs | load average |", "|---|---|---|---|---|---|---|---|---|"]
    loads = [r["load_average_before"] for r in rows] + [r["load_average_after"] for r in rows]
    load = f"{min(loads):.1f}-{max(loads):.1f}"
    sel = [r for r in rows if r["granularity"] == "per_channel"]
    batches = sorted({v["batch"] for r in sel for k, v in r["onnxruntime"]["latency"].items()
                      if k.startswith("batch_")})

    def cell(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    for b in batches:
        lat = [r["onnxruntime"]["latency"][f"batch_{b}"] for r in sel]
        lines.append(f"| onnxruntime | {b} | {sel[0]['onnxruntime']['latency']['threads']} | "
                     f"{statistics.median(v['fp32_ms'] for v in lat):.3f} | "
                     f"{statistics.median(v['int8_ms'] for v in lat):.3f} | "
                     f"{cell([v['int8_over_fp32'] for v in lat])} | "
                     f"{cell([v['int8_min_ms'] / v['fp32_min_ms'] for v in lat])} | {len(lat)} | {load} |")
    ao = [r["torchao"] for r in sel]
    t = ao[0]["timing"]
    lines.append(f"| torchao (fp32: eager PyTorch) | {t['batch_size']} | {t['threads']} | "
                 f"{statistics.median(a['fp32_ms_per_batch'] for a in ao):.3f} | "
                 f"{statistics.median(a['int8_ms_per_batch'] for a in ao):.3f} | "
                 f"{cell([a['int8_ms_per_batch'] / a['fp32_ms_per_batch'] for a in ao])} | "
                 f"{cell([a['timing']['int8_min_ms'] / a['timing']['fp32_min_ms'] for a in ao])} | {len(ao)} | "
                 f"{load} |")
    return "\n".join(lines)


def latency_sweep(run: Path, sizes: list[int], threads: int, repeats: int, out: Path) -> str:
    """INT8 / fp32 in onnxruntime for the deployed network of one trained run at several input sizes (the net is
    convolutional with global pooling, so it runs at any size). Calibration on random images: latency depends on
    shapes, not on the ranges; the timed batch is random too. The median and the fastest run are both shown: on a
    CPU shared with other jobs, a run that lasts longer is descheduled more often, which inflates the medians of slow
    runs more than those of fast ones."""
    import torch

    from repopt.app.commands.quantize import load_deployed, paired_latency_ms
    from repopt.quant import OnnxModel, OnnxQuantSettings, export_onnx, quantize_onnx

    model, cfg = load_deployed(run)
    lines = [f"{cfg['arch']} ({cfg['method']}, {run}), onnxruntime {threads} thread(s), median of {repeats} "
             f"alternating runs", "", "| input | batch | fp32 ms median (min) | INT8 ms median (min) | INT8 / fp32 of "
             "medians | of minima | load average |", "|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        fp32_path, int8_path = out / f"sweep-{size}.onnx", out / f"sweep-{size}.int8.onnx"
        export_onnx(model, torch.zeros(2, 3, size, size), fp32_path, fold=False)
        calib = [torch.randn(64, 3, size, size, generator=g) for _ in range(4)]
        quantize_onnx(fp32_path, int8_path, calib, OnnxQuantSettings(calib_batches=4))
        f, q = OnnxModel(fp32_path, threads, False), OnnxModel(int8_path, threads, False)
        for b in (1, 64):
            f_ms, q_ms = paired_latency_ms(f.runner(calib[0][:b]), q.runner(calib[0][:b]), None, repeats)
            fm, qm = statistics.median(f_ms), statistics.median(q_ms)
            lines.append(f"| {size}x{size} | {b} | {fm:.3f} ({min(f_ms):.3f}) | {qm:.3f} ({min(q_ms):.3f}) | "
                         f"{qm / fm:.2f} | {min(q_ms) / min(f_ms):.2f} | {os.getloadavg()[0]:.1f} |")
    return "\n".join(lines)


def describe(rows: list[dict]) -> str:
    first = rows[0]["onnxruntime"]
    s, ao = first["settings"], rows[0]["torchao"]["settings"]
    src = first["source"]
    folders = list(dict.fromkeys(r["folder"] for r in rows))
    return (f"{src['arch']} trained on {src['dataset']} ({src['epochs']} epochs), {len(folders)} folder(s): "
            f"{', '.join(folders)}; test set {first['test']['dataset']} ({first['test']['images']} images).\n"
            f"onnxruntime {s['onnxruntime']}: QDQ, int8 symmetric weights, {s['activations']} activations, "
            f"{s['calibrate_method']} calibration on {first['calibration']['images']} training images, "
            f"reduce_range={s['reduce_range']}. torchao {ao['torchao']}: X86InductorQuantizer, "
            f"{ao['activation_observer']} observer, reduce_range={ao['reduce_range']}, {ao['images_seen']} "
            f"calibration images. CPU VNNI: {s['cpu_vnni']}; {os.cpu_count()} CPUs.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", type=Path, help="`repopt pipeline` output folders (one per seed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, required=True, help="folder for the INT8 files and the raw JSON")
    p.add_argument("--tables-only", action="store_true", help="print the tables from OUT/int8-onnx-table.json")
    p.add_argument("--latency-sweep", metavar="RUN", type=Path, default=None,
                   help="instead: time the deployed network of RUN at the --sizes given, fp32 vs INT8 in onnxruntime")
    p.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 64])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.latency_sweep:
        print(latency_sweep(args.latency_sweep, args.sizes, args.threads, args.repeats, args.out))
        return
    raw = args.out / "int8-onnx-table.json"
    if args.tables_only:
        rows = json.loads(raw.read_text())["rows"]
    else:
        rows = measure(args.folders, args.methods, args.calib_batches, args.threads, args.repeats, args.out)
        from repopt._io import write_json

        write_json(raw, {"argv": sys.argv, "rows": rows})
    print(describe(rows), "\n")
    print(accuracy_table(rows, args.methods), "\n")
    print(paired(rows, args.methods), "\n")
    print(latency_table(rows))


if __name__ == "__main__":
    main()
