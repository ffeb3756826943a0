"""The figure of docs/results.md, drawn from the same run files as tables.py (nothing typed by hand).

    python bench/experiments/plots.py --root runs/fmnist --out docs/results-fmnist.png

Left: test top-1 against depth for plain, RepVGG and RepOpt (mean and standard error over seeds, tables.py's
table 1). Right: top-1 lost to per-tensor INT8 post-training quantization on each net (torchao, table 4).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fmnist import METHODS, NETS, SEEDS  # noqa: E402
from stats import se  # noqa: E402
from tables import _json, _method_top1, _pipeline  # noqa: E402

from repopt._io import atomic_write  # noqa: E402

DEPTH = {"repopt_vgg_tiny": 7, "repopt_vgg_a0": 22, "repopt_vgg_l0": 48}  # 3x3 conv layers of the deployed net
COLOURS = {"repopt": "tab:green", "repvgg": "tab:blue", "plain": "tab:red"}


def _mean_se(values: list[float | None]) -> tuple[float, float] | None:
    got = [v for v in values if v is not None]
    return (statistics.mean(got), se(got)) if got else None


def depth_points(root: Path) -> dict[str, list[tuple[int, float, float]]]:
    """method -> [(layers, mean top-1, standard error)] over the nets whose pipelines exist."""
    out: dict[str, list[tuple[int, float, float]]] = {m: [] for m in METHODS}
    for net in sorted(NETS, key=DEPTH.__getitem__):
        reports = [_pipeline(root, net, s) for s in SEEDS]
        for method in METHODS:
            ms = _mean_se([_method_top1(r, method) for r in reports])
            if ms:
                out[method].append((DEPTH[net], *ms))
    return out


def int8_drops(root: Path, granularity: str = "per-tensor") -> dict[str, list[tuple[int, float, float]]]:
    """method -> [(layers, mean fp32 - INT8 top-1, standard error)] from `repopt quantize --json` files."""
    out: dict[str, list[tuple[int, float, float]]] = {m: [] for m in METHODS}
    for net in sorted(NETS, key=DEPTH.__getitem__):
        for method in METHODS:
            runs = [_json(root / "int8" / net / f"s{s}" / f"{method}-{granularity}.json") for s in SEEDS]
            ms = _mean_se([r["fp32_top1"] - r["int8_top1"] if r else None for r in runs])
            if ms:
                out[method].append((DEPTH[net], *ms))
    return out


def draw(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 1.6
    depth, int8 = depth_points(root), int8_drops(root)
    for i, method in enumerate(METHODS):
        if depth[method]:
            x, y, e = zip(*depth[method])
            left.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method, color=COLOURS[method])
        if drops := int8[method]:
            x, y, e = zip(*drops)
            right.bar([v + (i - 1) * width for v in x], y, width=width, yerr=e, capsize=2, label=method,
                      color=COLOURS[method])
    left.set(xlabel="3x3 conv layers", ylabel="test top-1 (%)", title="Fashion-MNIST: top-1 against depth")
    right.set(xlabel="3x3 conv layers", ylabel="top-1 lost (points)", title="per-tensor INT8 (torchao): top-1 lost")
    for ax in (left, right):
        ax.set_xticks(sorted(DEPTH.values()))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100))  # the PNG appears whole or not at all
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/fmnist")
    ap.add_argument("--out", default="results-fmnist.png")
    args = ap.parse_args()
    draw(Path(args.root), Path(args.out))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
