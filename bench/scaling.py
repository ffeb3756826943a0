"""How the figures of `repopt bench` scale with model width and depth (RepOpt-VGG, 32x32 images, batch 64).

Sweeps the stage widths of the B family (blocks 4-6-16-1; width multiplier m: stage widths 64m, 128m, 256m, 1024m,
so m=2 is RepOpt-VGG-B1) and the depth at m=1 (blocks per stage), and for each model
measures, interleaved: the optimizer step ratio (RepOptSGD / torch SGD, fused), the training step ratio against the
plain target model, the throughput ratio against RepVGG, and the ratio of activation bytes saved for backward
(RepOpt / RepVGG; in-process, allocator-independent). Writes a table to stdout, JSON and a PNG plot.

    python bench/scaling.py [--out docs/benchmarks_scaling.png] [--json docs/benchmarks_scaling.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from repopt.app.bench.memory import saved_activation_bytes
from repopt.app.bench.optimizer import optimizer_step
from repopt.app.bench.timing import environment, load_average
from repopt.app.bench.training import training_steps
from repopt.app.bench.workloads import batch, build
from repopt.models import VGGConfig

WIDTHS = (0.25, 0.5, 1.0, 2.0)
DEPTHS = ((1, 1, 1, 1), (2, 3, 8, 1), (4, 6, 16, 1), (8, 14, 24, 1))


def config(width: float, blocks) -> VGGConfig:
    return VGGConfig.from_multipliers(blocks, (width, width, width, 2 * width))


def measure(cfg: VGGConfig, image_size: int, batch_size: int, repeats: int, opt_repeats: int) -> dict:
    opt = optimizer_step(cfg, 10, opt_repeats)
    train = training_steps(cfg, image_size, batch_size, repeats, num_classes=10)
    x, y = batch(batch_size, image_size, 10)
    saved = {m: saved_activation_bytes(build(m, cfg, 10)[0], x, y) for m in ("repopt", "repvgg")}
    return {"params": opt["params"], "optimizer_step_ratio": opt["ratio"],
            "train_step_ratio_vs_plain": train["step_ratio_repopt_vs_plain"],
            "train_throughput_ratio_vs_repvgg": train["throughput_ratio_repopt_vs_repvgg"],
            "saved_activation_ratio_vs_repvgg": saved["repopt"] / saved["repvgg"],
            "ms_per_step": {m: 1e3 * train[m]["median_s"] for m in ("plain", "repopt", "repvgg")},
            "optimizer_ms": {"torch_sgd": 1e3 * opt["torch_sgd"]["median_s"],
                             "repopt_sgd": 1e3 * opt["repopt_sgd"]["median_s"]}}


# (key, label in the plot, column in the table)
FIGURES = (("optimizer_step_ratio", "optimizer step / torch SGD", "opt/SGD"),
           ("train_step_ratio_vs_plain", "training step / plain", "step/plain"),
           ("train_throughput_ratio_vs_repvgg", "throughput / RepVGG", "img/s vs RepVGG"),
           ("saved_activation_ratio_vs_repvgg", "saved activations / RepVGG", "saved act./RepVGG"))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, sweep, xlabel in ((axes[0], "width", "width multiplier (blocks 4-6-16-1)"),
                              (axes[1], "depth", "target convs (width multiplier 1)")):
        rows = result[sweep]
        xs = [r["x"] for r in rows]
        for key, label, _ in FIGURES:
            ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio (RepOpt-VGG over the baseline)")
    axes[1].legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"RepOpt-VGG scaling, 32x32, batch {result['batch_size']}: {env['device']}, "
                 f"torch {env['torch']}, {env['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks_scaling.png")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--repeats", type=int, default=5, help="training rounds per model")
    ap.add_argument("--opt-repeats", type=int, default=21, help="optimizer-step rounds per model")
    ap.add_argument("--quick", action="store_true", help="two small points per sweep, batch 8 (a smoke run)")
    args = ap.parse_args()
    widths, depths, batch_size = WIDTHS, DEPTHS, 64
    if args.quick:
        widths, depths, batch_size = WIDTHS[:2], DEPTHS[:2], 8
    result = {"environment": environment(torch.device("cpu")), "image_size": 32, "batch_size": batch_size,
              "width": [], "depth": []}
    for w in widths:
        row = measure(config(w, DEPTHS[2]), 32, batch_size, args.repeats, args.opt_repeats)
        result["width"].append({"x": w, **row})
        print(f"width {w}: done", file=sys.stderr)
    for d in depths:
        row = measure(config(1.0, d), 32, batch_size, args.repeats, args.opt_repeats)
        result["depth"].append({"x": sum(d) + 1, "blocks": list(d), **row})
        print(f"depth {d}: done", file=sys.stderr)
    env = result["environment"]
    print(f"{env['device']}, torch {env['torch']}, {env['threads']} threads, 32x32, batch {batch_size}, load average "
          f"{env['load_average_1min']:.2f} at start, {load_average():.2f} at end")
    print(f"{'sweep':6s} {'x':>5s} {'params':>8s} " + " ".join(f"{c:>17s}" for *_, c in FIGURES)
          + f" {'SGD ms':>7s} {'RepOpt ms':>9s}")
    for sweep in ("width", "depth"):
        for r in result[sweep]:
            print(f"{sweep:6s} {r['x']:5g} {r['params'] / 1e6:7.2f}M "
                  + " ".join(f"{r[k]:17.3f}" for k, *_ in FIGURES)
                  + f" {r['optimizer_ms']['torch_sgd']:7.1f} {r['optimizer_ms']['repopt_sgd']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    plot(result, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
