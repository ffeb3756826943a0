"""The convergence section of docs/results.md, printed from the run files of bench/experiments/convergence.py.

    python bench/experiments/convergence_tables.py --root runs/convergence     # tables C1-C4 (runs not done: '-')
    python bench/experiments/convergence_tables.py --root runs/convergence --json FILE   # the same figures as JSON

C1  final top-1 per net, schedule and method; paired differences RepOpt - RepVGG and RepOpt - plain, by seed
C2  convergence: how far each method's test top-1 still moved over the last fifth of its longest run, and what the
    longest schedule gained over the next shorter one (paired by seed)
C3  the paper's Table 4 at its schedule (the longest unless the study sets another) on the 48-layer net
C4  time-to-accuracy: images seen and wall time until each method's test top-1 first reaches RepVGG's final top-1 of
    the same schedule and seed (wall time = images x the seconds per image measured side by side by
    method_throughput.py; evaluation time excluded)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from convergence import Study, sched_dir  # noqa: E402
from stats import mean_se, paired, paired_cell, se  # noqa: E402
from tables import _json  # noqa: E402

from repopt._io import write_json  # noqa: E402

CONVERGED_POINTS = 0.3  # the criterion: moved less than this over the last fifth, and the longer run gains less
ABLATIONS = (("RepOpt (full)", None), ("masks, no re-initialisation", "no-reinit"),
             ("re-initialisation, no masks", "no-mask"), ("all scales 1 (no search)", "ones"))


def curve(run: Path) -> list[tuple[int, float, float]] | None:
    """[(epoch, images seen, test top-1)] of a finished run's tested epochs; None while it is not finished."""
    if not (run / "result.json").is_file():
        return None
    seen, out = 0.0, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        seen += m["images_per_s"] * m["epoch_seconds"]  # the images this epoch trained on
        if m["test_top1"] is not None:
            out.append((m["epoch"], round(seen), m["test_top1"]))
    return out


def mean_curve_of(runs: list[Path]) -> list[tuple[float, float]]:
    """[(images seen, mean test top-1)] over the runs that finished (the same tested epochs in each)."""
    curves = [c for c in map(curve, runs) if c]
    if not curves:
        return []
    return [(statistics.mean(c[i][1] for c in curves), statistics.mean(c[i][2] for c in curves))
            for i in range(min(len(c) for c in curves))]


def final(run: Path) -> float | None:
    r = _json(run / "result.json")
    return None if r is None else r["top1"]


def _cells(values: list[float | None]) -> str:
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values)


def _ms(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return mean_se(got) if got else "-"


def _pair(a: list[float | None], b: list[float | None]) -> tuple[str, dict | None]:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return "-", None
    p = paired([x for x, _ in pairs], [y for _, y in pairs])
    return paired_cell(p), p


def finals(root: Path, st: Study, net: str, epochs: int, method: str) -> list[float | None]:
    return [final(root / sched_dir(net, epochs, method, s)) for s in st.seeds]


def table_final(root: Path, st: Study, out: dict) -> None:
    print("## C1. Final top-1 by schedule length\n")
    print(f"| net | epochs | method | top-1 per seed {', '.join(map(str, st.seeds))} (%) | mean ± s.e. (%) | "
          "paired: repopt - this |")
    print("|---|---|---|---|---|---|")
    for net in st.nets:
        for epochs in sorted(st.lengths):
            repopt = finals(root, st, net, epochs, "repopt")
            for method in st.methods:
                values = finals(root, st, net, epochs, method)
                cell, p = ("", None) if method == "repopt" else _pair(repopt, values)
                out.setdefault("final", {}).setdefault(net, {}).setdefault(str(epochs), {})[method] = {
                    "per_seed": values, "paired_repopt_minus_this": p}
                print(f"| {net} | {epochs} | {method} | {_cells(values)} | {_ms(values)} | {cell} |")
    print()


def last_fifth_movement(c: list[tuple[int, float, float]]) -> float:
    """|top-1 at the end - top-1 at the last test at or before 80 % of the run| (points)."""
    last_epoch = c[-1][0]
    before = [t for e, _, t in c if e <= 0.8 * last_epoch]
    return abs(c[-1][2] - (before[-1] if before else c[0][2]))


def verdict_of(moved: list[float], gain: dict | None) -> str:
    """'no' when the runs still moved, or the longer schedule gained, CONVERGED_POINTS or more; 'yes' when both are
    below it; '-' while a figure is missing."""
    if moved and statistics.mean(moved) >= CONVERGED_POINTS or gain is not None and gain["mean"] >= CONVERGED_POINTS:
        return "no"
    return "yes" if moved and gain is not None else "-"


def table_convergence(root: Path, st: Study, out: dict) -> None:
    lengths = sorted(st.lengths)
    longest, shorter = lengths[-1], (lengths[-2] if len(lengths) > 1 else lengths[-1])  # one length: no gain
    print(f"## C2. Has each method converged? (criterion: < {CONVERGED_POINTS} points over the last fifth of the "
          f"{longest}-epoch run, and < {CONVERGED_POINTS} gained by {longest} over {shorter} epochs)\n")
    print(f"| net | method | moved over the last fifth of {longest} epochs, per seed (points) | mean ± s.e. | "
          f"gain {longest} - {shorter} epochs, paired | converged |")
    print("|---|---|---|---|---|---|")
    for net in st.nets:
        for method in st.methods:
            curves = [curve(root / sched_dir(net, longest, method, s)) for s in st.seeds]
            moved = [None if c is None else last_fifth_movement(c) for c in curves]
            cell, p = (_pair(finals(root, st, net, longest, method), finals(root, st, net, shorter, method))
                       if shorter != longest else ("-", None))
            got = [m for m in moved if m is not None]
            verdict = verdict_of(got, p)
            out.setdefault("convergence", {}).setdefault(net, {})[method] = {
                "moved_last_fifth": moved, "gain_longest_minus_shorter": p, "converged": verdict}
            print(f"| {net} | {method} | {_cells(moved)} | {_ms(moved)} | {cell} | {verdict} |")
    print()


def table_ablations(root: Path, st: Study, out: dict) -> None:
    longest = st.ablation_length
    print(f"## C3. The paper's Table 4 at {longest} epochs on {st.deepest}\n")
    print(f"| variant | top-1 per seed {', '.join(map(str, st.seeds))} (%) | mean ± s.e. (%) | paired: full - this |")
    print("|---|---|---|---|")
    full = finals(root, st, st.deepest, longest, "repopt")
    rows = [(label, full if v is None else [final(root / "ablation" / v / f"s{s}") for s in st.seeds])
            for label, v in ABLATIONS] + [("plain SGD", finals(root, st, st.deepest, longest, "plain"))]
    for label, values in rows:
        cell, p = ("", None) if values is full else _pair(full, values)
        out.setdefault("ablations", {})[label] = {"per_seed": values, "paired_full_minus_this": p}
        print(f"| {label} | {_cells(values)} | {_ms(values)} | {cell} |")
    print()


def seconds_per_image(root: Path) -> dict | None:
    t = _json(root / "throughput.json")
    return None if t is None else t["nets"]


def first_reach(c: list[tuple[int, float, float]], target: float) -> float | None:
    """Images seen at the first test whose top-1 is at least `target` (None: never)."""
    return next((seen for _, seen, top1 in c if top1 >= target), None)


def table_time_to_accuracy(root: Path, st: Study, out: dict) -> None:
    spi = seconds_per_image(root)
    print("## C4. Time to RepVGG's final accuracy (same schedule and seed)\n")
    print("| net | epochs | method | images seen, per seed (thousands) | mean ± s.e. (thousands) | wall time, "
          "mean (s) | reached |")
    print("|---|---|---|---|---|---|---|")
    for net in st.nets:
        for epochs in sorted(st.lengths):
            targets = finals(root, st, net, epochs, "repvgg")
            for method in st.methods:
                images, finished = [], 0
                for s, target in zip(st.seeds, targets):
                    c = curve(root / sched_dir(net, epochs, method, s))
                    finished += c is not None and target is not None
                    images.append(None if c is None or target is None else first_reach(c, target))
                reached = [i for i in images if i is not None]
                wall = (f"{statistics.mean(reached) * spi[net][method]:.0f}" if reached and spi and net in spi
                        else "-")
                k = [v / 1000 for v in reached]
                out.setdefault("time_to_accuracy", {}).setdefault(net, {}).setdefault(str(epochs), {})[method] = {
                    "images_per_seed": images, "seconds_per_image": spi[net][method] if spi and net in spi else None}
                print(f"| {net} | {epochs} | {method} | {_cells([None if i is None else i / 1000 for i in images])}"
                      f" | {mean_se(k) if k else '-'} | {wall} | {len(reached)}/{finished} |")
    if spi:
        print("\nSeconds per training image, measured side by side (method_throughput.py, one thread): " + "; ".join(
            f"{net}: " + ", ".join(f"{m} {1 / spi[net][m]:.0f} images/s" for m in st.methods) for net in spi))
    print()


def tables(root: Path, out: dict) -> None:
    """Print every table of the study under `root`; fill `out` with their figures."""
    st = Study.load(root)
    out["study"] = {"nets": st.nets, "lengths": st.lengths, "seeds": st.seeds, "train_subset": st.train_subset,
                    "image_size": st.image_size, "batch_size": st.batch_size}
    for table in (table_final, table_convergence, table_ablations, table_time_to_accuracy):
        table(root, st, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/convergence")
    ap.add_argument("--json", default=None, help="also write every figure of the tables to this JSON file")
    args = ap.parse_args()
    root, out = Path(args.root), {}
    tables(root, out)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
