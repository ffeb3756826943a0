"""Summarize several `repopt pipeline` runs (one per seed) into the markdown table of docs/results.md, and compare
the first method with the others seed by seed.

    python bench/results_table.py runs/seed0 runs/seed1 runs/seed2
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    reports = [json.loads((Path(d) / "report.json").read_text()) for d in dirs]
    first = reports[0]
    print(f"{first['arch']} on {first['dataset']}, {first['epochs']} epochs (hyper-search {first['hs_epochs']}), "
          f"batch {first['batch_size']}, {first['optimizer']}, seeds {[r['seed'] for r in reports]}\n")
    digits = first["dataset"] == "digits"  # 360 test images: show accuracy as a count of mistakes too
    print("| method | top-1 per seed (%) | mean top-1 (%) | INT8 top-1 mean (%) |"
          + (" test errors (of 360) per seed |" if digits else ""))
    print("|---|---|---|---|" + ("---|" if digits else ""))
    for method in [row["method"] for row in first["results"]]:
        rows = [next(x for x in r["results"] if x["method"] == method) for r in reports]
        top1 = [x["top1"] for x in rows]
        int8 = [x["int8_top1"] for x in rows if "int8_top1" in x]
        errors = [round((100 - t) * 3.6) for t in top1]
        int8_cell = f"{statistics.mean(int8):.2f}" if int8 else "-"
        print(f"| {method} | {' / '.join(f'{t:.2f}' for t in top1)} | {statistics.mean(top1):.2f} | {int8_cell} |"
              + (f" {' / '.join(map(str, errors))} |" if digits else ""))
    hs = [r["hs_top1"] for r in reports]
    print(f"\nhyper-search model top-1 per seed: {' / '.join(f'{t:.2f}' for t in hs)}")
    if len(reports) > 1:
        _paired(reports, [row["method"] for row in first["results"]])


def _paired(reports: list[dict], methods: list[str]) -> None:
    """The first method against each other one, seed by seed: mean difference, its standard error, wins/ties/losses."""
    def top1(r, m):
        return next(x for x in r["results"] if x["method"] == m)["top1"]

    base = methods[0]
    print()
    for other in methods[1:]:
        diffs = [top1(r, base) - top1(r, other) for r in reports]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5
        wins, ties = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
        print(f"{base} - {other}, paired by seed: mean {statistics.mean(diffs):+.2f} points (standard error "
              f"{se:.2f}), median {statistics.median(diffs):+.2f}; {base} ahead in {wins}, tied in {ties}, behind in "
              f"{len(diffs) - wins - ties} of {len(diffs)} seeds")


if __name__ == "__main__":
    main(sys.argv[1:])
