"""The convergence figure of docs/results.md, from the same run files as convergence_tables.py.

    python bench/experiments/convergence_plot.py --root runs/convergence --out docs/results-convergence.png

One row per net. Left: final test top-1 against schedule length (mean and standard error over seeds). Middle: test
top-1 during the longest schedule against images seen (mean over seeds). Right: the same against training wall time,
images seen x the seconds per image measured side by side (method_throughput.py; no evaluation time).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from convergence import Study, sched_dir  # noqa: E402
from convergence_tables import final, mean_curve_of, seconds_per_image  # noqa: E402
from plots import COLOURS  # noqa: E402
from stats import se  # noqa: E402

from repopt._io import atomic_write  # noqa: E402


def mean_curve(root: Path, st: Study, net: str, epochs: int, method: str) -> list[tuple[float, float]]:
    """[(images seen, mean test top-1)] over the seeds whose run finished."""
    return mean_curve_of([root / sched_dir(net, epochs, method, s) for s in st.seeds])


def draw(root: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, spi = Study.load(root), seconds_per_image(root)
    fig, axes = plt.subplots(len(st.nets), 3, figsize=(14, 4 * len(st.nets)), squeeze=False)
    for row, net in zip(axes, st.nets):
        by_length, by_images, by_time = row
        for method in st.methods:
            points = []
            for epochs in sorted(st.lengths):
                got = [v for v in (final(root / sched_dir(net, epochs, method, s)) for s in st.seeds) if v is not None]
                if got:
                    points.append((epochs, statistics.mean(got), se(got)))
            if points:
                x, y, e = zip(*points)
                by_length.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method, color=COLOURS[method])
            c = mean_curve(root, st, net, st.longest, method)
            if c:
                images, top1 = zip(*c)
                by_images.plot([i / 1000 for i in images], top1, marker=".", label=method, color=COLOURS[method])
                if spi and net in spi:
                    by_time.plot([i * spi[net][method] for i in images], top1, marker=".", label=method,
                                 color=COLOURS[method])
        by_length.set(xlabel="schedule (epochs)", ylabel="final test top-1 (%)", title=f"{net}: final top-1",
                      xticks=sorted(st.lengths))
        by_images.set(xlabel="training images seen (thousands)", ylabel="test top-1 (%)",
                      title=f"{net}: {st.longest}-epoch schedule")
        by_time.set(xlabel="training wall time (s, side-by-side throughput)", ylabel="test top-1 (%)",
                    title=f"{net}: {st.longest}-epoch schedule")
        for ax in row:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a panel whose runs are not done yet has nothing to name
                ax.legend()
        for ax in (by_images, by_time):
            ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90))  # the PNG appears whole or not at all
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/convergence")
    ap.add_argument("--out", default="results-convergence.png")
    args = ap.parse_args()
    draw(Path(args.root), Path(args.out))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
