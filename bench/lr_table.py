"""Top-1 of `repopt train` / `repopt pipeline` runs grouped by method and learning rate, one column per seed (the
learning-rate sweep of docs/results.md section 9c).

    python bench/lr_table.py runs/long0 runs/long1 runs/sweep/repopt-lr0.05-s0 ...

A pipeline directory contributes its repopt, repvgg and plain runs; a train directory itself. Method, learning rate
and seed are read from the config each run saved in its model.safetensors, top-1 from its result.json.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _runs(directory: Path):
    if (directory / "report.json").is_file():  # a pipeline: its method subdirectories
        for sub in sorted(directory.iterdir()):
            if (sub / "result.json").is_file() and (sub / "model.safetensors").is_file() and sub.name != "search":
                yield sub
    elif (directory / "result.json").is_file():
        yield directory
    else:
        raise SystemExit(f"{directory}: neither a pipeline (report.json) nor a training run (result.json)")


def main(dirs: list[str]) -> None:
    from safetensors import safe_open

    table: dict[tuple[str, float], dict[int, float]] = {}
    for d in dirs:
        for run in _runs(Path(d)):
            with safe_open(str(run / "model.safetensors"), "pt") as f:
                cfg = json.loads(f.metadata()["config"])
            top1 = json.loads((run / "result.json").read_text())["top1"]
            table.setdefault((cfg["method"], cfg["lr"]), {})[cfg["seed"]] = top1
    seeds = sorted({s for v in table.values() for s in v})
    print(f"| method | lr | top-1 per seed {', '.join(map(str, seeds))} (%) | mean top-1 (%) |")
    print("|---|---|---|---|")
    for method, lr in sorted(table, key=lambda k: (k[0], -k[1])):
        v = table[(method, lr)]
        cells = " / ".join(f"{v[s]:.2f}" if s in v else "-" for s in seeds)
        print(f"| {method} | {lr:g} | {cells} | {statistics.mean(v.values()):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
