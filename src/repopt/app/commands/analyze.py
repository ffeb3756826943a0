"""`repopt analyze`: spread of the deployed kernels per layer (the paper's Table 11) and their histograms."""
from __future__ import annotations

import json
import statistics

NAME = "analyze"
HELP = ("Per-layer std of the deployed 3x3 kernels (all taps, centre tap, surrounding taps) of one or more trained "
        "runs, as in the paper's Table 11, and a histogram figure.")
EXAMPLES = """examples:
  repopt analyze runs/pipeline/repopt runs/pipeline/repvgg runs/pipeline/plain --plot kernels.png
  repopt analyze runs/pipeline/repvgg --layer stages.3.0.conv --plot deep.png --json

Kernels are measured as deployed: RepVGG blocks fused, BN folded into the convs. A wide kernel distribution (fused
RepVGG: the centre tap carries the identity and 1x1 branches) wastes int8 levels; that is why it quantizes badly.
The figure needs the `plot` extra: pip install 'repopt[plot]'.
"""


def add_arguments(p) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="RUN", help="run directories, model.safetensors or checkpoint.pt")
    p.add_argument("--plot", default=None, metavar="PNG", help="write histograms of centre and surrounding taps")
    p.add_argument("--layer", default=None, help="histogram of this conv only (default: all 3x3 convs pooled)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")


def summarize(rows: list[dict]) -> dict:
    """Means over layers, the centre/surround ratio, and the deepest layer (the paper quotes a deep one)."""
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    return {"layers": len(rows), "mean_std": mean("std"), "mean_std_centre": mean("std_centre"),
            "mean_std_surround": mean("std_surround"),
            "centre_over_surround": mean("std_centre") / mean("std_surround"),
            "max_abs": max(r["max_abs"] for r in rows), "last_layer": rows[-1]["name"], "last_std": rows[-1]["std"]}


def _labels(runs: list[tuple[str, dict]]) -> list[str]:
    """The method name, or method + path when two runs share a method."""
    methods = [cfg["method"] for _, cfg in runs]
    return [m if methods.count(m) == 1 else f"{m} ({path})" for m, (path, _) in zip(methods, runs)]


def run(args) -> int:
    from ..cli import UserError
    from ...quant import MissingExtraError, kernel_stats, plot_kernel_histograms
    from .quantize import load_deployed

    loaded = [(path, *load_deployed(path)) for path in args.checkpoints]
    labels = _labels([(path, cfg) for path, _, cfg in loaded])
    report = []
    for label, (path, model, cfg) in zip(labels, loaded):
        rows = kernel_stats(model, fold=False)  # already folded by load_deployed
        if not rows:
            raise UserError(f"{path}: the deployed model has no square KxK conv (K > 1) to analyze")
        if args.layer and args.layer not in {r["name"] for r in rows}:
            raise UserError(f"{path} has no KxK conv named {args.layer!r}; its convs are "
                            f"{', '.join(r['name'] for r in rows)}")
        report.append({"label": label, "checkpoint": str(path), "method": cfg["method"], "arch": cfg["arch"],
                       "layers": rows, "summary": summarize(rows)})
    out = {"runs": report}
    if args.plot:
        try:
            plot_kernel_histograms({r["label"]: m for r, (_, m, _) in zip(report, loaded)}, args.plot,
                                   layer=args.layer, fold=False)
        except MissingExtraError as e:
            raise UserError(str(e)) from None
        out["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for r in report:
        print(f"{r['label']}: {r['arch']} from {r['checkpoint']}")
        print(f"  {'layer':<24} {'shape':<16} {'std':>8} {'centre':>8} {'surround':>8} {'max|w|':>8}")
        for row in r["layers"]:
            shape = "x".join(map(str, row["shape"]))
            print(f"  {row['name']:<24} {shape:<16} {row['std']:8.4f} {row['std_centre']:8.4f} "
                  f"{row['std_surround']:8.4f} {row['max_abs']:8.4f}")
    print("summary (means over layers; ratio = centre std / surrounding std):")
    width = max(len(r["label"]) for r in report)
    for r in report:
        s = r["summary"]
        print(f"  {r['label']:<{width}}  std {s['mean_std']:.4f}  centre {s['mean_std_centre']:.4f}  surround "
              f"{s['mean_std_surround']:.4f}  ratio {s['centre_over_surround']:.2f}  max|w| {s['max_abs']:.3f}  "
              f"last layer ({s['last_layer']}) std {s['last_std']:.4f}")
    if args.plot:
        print(f"histograms written to {args.plot}")
    return 0
