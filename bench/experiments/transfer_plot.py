"""The transfer figure of docs/results.md section 11, from the run files of bench/experiments/transfer.py.

    python bench/experiments/transfer_plot.py --root runs/transfer --out docs/results-transfer.png

Test top-1 on the fine-tuning classes against images seen (mean over the seeds whose run finished): the three
fine-tuned rows (solid) and the three trained from scratch on the same small subset (dashed), one colour per method.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from convergence_tables import mean_curve_of  # noqa: E402
from plots import COLOURS  # noqa: E402
from transfer import ROWS, Study  # noqa: E402

from repopt._io import atomic_write  # noqa: E402


def mean_curve(root: Path, st: Study, row: str) -> list[tuple[float, float]]:
    """[(images seen, mean test top-1)] of one row over its finished seeds."""
    return mean_curve_of([root / row / f"s{s}" for s in st.seeds])


def draw(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = Study.load(root)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in ROWS:
        start, method = row.split("/")
        label = f"{method}, " + ("fine-tuned" if start == "ft" else "from scratch")
        if row == "ft/plain":
            label = "plain SGD on RepOpt's weights, fine-tuned"
        c = mean_curve(root, st, row)
        if c:
            images, top1 = zip(*c)
            ax.plot([i / 1000 for i in images], top1, marker=".", color=COLOURS[method],
                    linestyle="-" if start == "ft" else "--", alpha=0.6 if row == "ft/plain" else 1.0, label=label)
    ax.set(xlabel="fine-tuning images seen (thousands)", ylabel=f"test top-1 on classes {st.finetune_classes} (%)",
           title=f"{st.net}: pre-trained on {st.pretrain_classes}, fine-tuned on {st.subset} images")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90))  # the PNG appears whole or not at all
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/transfer")
    ap.add_argument("--out", default="results-transfer.png")
    args = ap.parse_args()
    draw(Path(args.root), Path(args.out))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
