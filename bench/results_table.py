"""Summarize several `repopt pipeline` runs (one per seed) into the markdown table of docs/results.md, and compare
the first method with the others seed by seed.

    python bench/results_table.py runs/seed0 runs/seed1 runs/seed2
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/stats.py


def main(dirs: list[str]) -> None:
    from stats import mean_se

    reports = [json.loads((Path(d) / "report.json").read_text()) for d in dirs]
    first = reports[0]
    subset = f" (training subset {first['train_subset']})" if first.get("train_subset") else ""
    print(f"{first['arch']} on {first['dataset']}{subset}, {first['epochs']} epochs "
          f"(hyper-search {first['hs_epochs']}), "
          f"batch {first['batch_size']}, {first['optimizer']}, seeds {[r['seed'] for r in reports]}\n")
    digits = first["dataset"] == "digits"  # 360 test images: show accuracy as a count of mistakes too
    print("| method | top-1 per seed (%) | mean ± s.e. (%) | INT8 top-1 mean ± s.e. (%) |"
          + (" test errors (of 360) per seed |" if digits else ""))
    print("|---|---|---|---|" + ("---|" if digits else ""))
    for method in [row["method"] for row in first["results"]]:
        rows = [next(x for x in r["results"] if x["method"] == method) for r in reports]
        top1 = [x["top1"] for x in rows]
        int8 = [x["int8_top1"] for x in rows if "int8_top1" in x]
        errors = [round((100 - t) * 3.6) for t in top1]
        int8_cell = mean_se(int8) if int8 else "-"
        print(f"| {method} | {' / '.join(f'{t:.2f}' for t in top1)} | {mean_se(top1)} | {int8_cell} |"
              + (f" {' / '.join(map(str, errors))} |" if digits else ""))
    hs = [r["hs_top1"] for r in reports if r.get("hs_top1") is not None]
    if hs:
        print(f"\nhyper-search model top-1 per seed: {' / '.join(f'{t:.2f}' for t in hs)}")
    if len(reports) > 1:
        _paired(reports, [row["method"] for row in first["results"]])


def _paired(reports: list[dict], methods: list[str]) -> None:
    """The first method against each other one, seed by seed: mean difference, its standard error, wins/ties/losses."""
    from stats import paired, paired_line

    def top1(r, m):
        return next(x for x in r["results"] if x["method"] == m)["top1"]

    base = methods[0]
    print()
    for other in methods[1:]:
        p = paired([top1(r, base) for r in reports], [top1(r, other) for r in reports])
        print(paired_line(base, other, p))


if __name__ == "__main__":
    main(sys.argv[1:])
