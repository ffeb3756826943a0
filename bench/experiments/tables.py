"""The six tables of docs/results.md, printed from the files the runs of bench/experiments/fmnist.py wrote
(report.json / result.json / the JSON of `repopt quantize` and `repopt analyze`); nothing is typed by hand.

    python bench/experiments/tables.py --root runs/fmnist            # all tables; runs not done yet show as '-'

Every cell over seeds is mean ± standard error; paired differences (same seed, data order and recipe) are
mean ± standard error, then (seeds ahead / tied / behind).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # fmnist.py (the run list and sizes), bench/stats.py

from fmnist import DEEPEST, METHODS, NETS, OLD_LR, SEEDS, SIZES  # noqa: E402
from stats import mean_se, paired, paired_cell  # noqa: E402

from repopt.app.recipes import DEFAULTS, scaled_lr  # noqa: E402

PAPER_TABLE4 = {"RepOpt (full)": 78.47, "masks, no re-initialisation": 77.42, "re-initialisation, no masks": 77.07,
                "all scales 1 (no search)": 77.59, "plain SGD": 76.91}  # RepOpt-VGG-B1, ImageNet (paper Table 4)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _top1(path: Path) -> float | None:
    """top-1 of a finished `repopt train` run directory."""
    r = _json(path / "result.json")
    return None if r is None else r["top1"]


def _pipeline(root: Path, net: str, seed: int) -> dict | None:
    return _json(root / "depth" / net / f"s{seed}" / "report.json")


def _method_top1(report: dict | None, method: str) -> float | None:
    if report is None:
        return None
    return next(r["top1"] for r in report["results"] if r["method"] == method)


def _row(label: str, values: list[float | None], extra: list[str] = ()) -> str:
    got = [v for v in values if v is not None]
    cells = " / ".join("-" if v is None else f"{v:.2f}" for v in values)
    return f"| {label} | {cells} | {mean_se(got) if got else '-'} |" + "".join(f" {e} |" for e in extra)


def _paired_or_dash(a: list[float | None], b: list[float | None]) -> str:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return paired_cell(paired([x for x, _ in pairs], [y for _, y in pairs])) if pairs else "-"


def depth(root: Path) -> None:
    print("## 1. Depth: plain vs RepVGG vs RepOpt, one recipe\n")
    print(f"| net | method | top-1 per seed {', '.join(map(str, SEEDS))} (%) | mean ± s.e. (%) | "
          f"paired: repopt - this |")
    print("|---|---|---|---|---|")
    for net in NETS:
        reports = [_pipeline(root, net, s) for s in SEEDS]
        repopt = [_method_top1(r, "repopt") for r in reports]
        for method in METHODS:
            values = [_method_top1(r, method) for r in reports]
            diff = "" if method == "repopt" else _paired_or_dash(repopt, values)
            print(_row(f"{net} | {method}", values, [diff]))
        hs = [None if r is None else r["hs_top1"] for r in reports]
        print(_row(f"{net} | (hyper-search model)", hs, [""]))
    print()


def ablations(root: Path) -> None:
    print(f"## 2. The paper's Table 4 on {DEEPEST}\n")
    print(f"| variant | top-1 per seed {', '.join(map(str, SEEDS))} (%) | mean ± s.e. (%) | paired: full RepOpt "
          f"- this | paper (B1, ImageNet) |")
    print("|---|---|---|---|---|")
    full = [_method_top1(_pipeline(root, DEEPEST, s), "repopt") for s in SEEDS]
    rows = {"RepOpt (full)": full,
            "masks, no re-initialisation": [_top1(root / "ablation" / "no-reinit" / f"s{s}") for s in SEEDS],
            "re-initialisation, no masks": [_top1(root / "ablation" / "no-mask" / f"s{s}") for s in SEEDS],
            "all scales 1 (no search)": [_top1(root / "ablation" / "ones" / f"s{s}") for s in SEEDS],
            "plain SGD": [_method_top1(_pipeline(root, DEEPEST, s), "plain") for s in SEEDS]}
    for label, values in rows.items():
        diff = "" if label == "RepOpt (full)" else _paired_or_dash(full, values)
        print(_row(label, values, [diff, f"{PAPER_TABLE4[label]:.2f}"]))
    print()


def transfer(root: Path) -> None:
    print(f"## 3. Search on another dataset: {DEEPEST}, target Fashion-MNIST\n")
    print(f"| scales searched on | top-1 per seed {', '.join(map(str, SEEDS))} (%) | mean ± s.e. (%) | paired: "
          f"this - searched on the target |")
    print("|---|---|---|---|")
    target = [_method_top1(_pipeline(root, DEEPEST, s), "repopt") for s in SEEDS]
    digits = [_top1(root / "transfer" / "repopt" / f"s{s}") for s in SEEDS]
    print(_row("Fashion-MNIST (the target's own training subset)", target, [""]))
    print(_row(f"digits (embedded UCI digits, {SIZES['digits_hs_epochs']} epochs)", digits,
               [_paired_or_dash(digits, target)]))
    repvgg = [_method_top1(_pipeline(root, DEEPEST, s), "repvgg") for s in SEEDS]
    print(_row("(RepVGG, for reference)", repvgg, [""]))
    hs = [_json(root / "transfer" / "digits-search" / f"s{s}" / "result.json") for s in SEEDS]
    got = [h["top1"] for h in hs if h]
    if got:
        print(f"\nhyper-search model top-1 on the digits test set per seed: {' / '.join(f'{v:.2f}' for v in got)}")
    print()


def int8(root: Path) -> None:
    print("## 4. INT8 post-training quantization (torchao PT2E, x86; `repopt quantize`) and kernel statistics\n")
    print("| net | method | weights | fp32 top-1 (%) | int8 top-1 (%) | drop (points) | logit SQNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for net in NETS:
        for method in METHODS:
            for q in ("per-channel", "per-tensor"):
                runs = [_json(root / "int8" / net / f"s{s}" / f"{method}-{q}.json") for s in SEEDS]
                runs = [r for r in runs if r]
                if not runs:
                    print(f"| {net} | {method} | {q} | - | - | - | - |")
                    continue
                fp32 = [r["fp32_top1"] for r in runs]
                i8 = [r["int8_top1"] for r in runs]
                drop = [a - b for a, b in zip(fp32, i8)]
                sqnr = [r["int8_logit_sqnr_db"] for r in runs]
                n = f" (n={len(runs)})" if len(runs) != len(SEEDS) else ""
                print(f"| {net} | {method} | {q}{n} | {mean_se(fp32)} | {mean_se(i8)} | {mean_se(drop)} | "
                      f"{mean_se(sqnr)} |")
    print("\nKernel statistics of the deployed networks (the paper's Table 11; `repopt analyze`): standard deviation "
          "of the 3x3 kernels' values, mean over layers, then over seeds\n")
    print("| net | method | std (all taps) | std (centre) | std (surround) | centre / surround |")
    print("|---|---|---|---|---|---|")
    for net in NETS:
        found = [_json(root / "analyze" / net / f"s{s}.json") for s in SEEDS]
        found = [f for f in found if f]
        for method in METHODS:
            rows = [next(r["summary"] for r in f["runs"] if r["method"] == method) for f in found]
            if not rows:
                print(f"| {net} | {method} | - | - | - | - |")
                continue
            cell = lambda key: f"{statistics.mean(r[key] for r in rows):.4f}"  # noqa: E731
            print(f"| {net} | {method} | {cell('mean_std')} | {cell('mean_std_centre')} | "
                  f"{cell('mean_std_surround')} | {statistics.mean(r['centre_over_surround'] for r in rows):.2f} |")
    print()


def optimizers(root: Path) -> None:
    print(f"## 5. SGD vs AdamW vs Lion on {DEEPEST}\n")
    print(f"| optimizer | method | top-1 per seed {', '.join(map(str, SEEDS))} (%) | mean ± s.e. (%) | paired: "
          f"repopt - this |")
    print("|---|---|---|---|---|")
    for opt in ("sgd", "adamw", "lion"):
        values = {}
        for method in METHODS:
            if opt == "sgd":
                values[method] = [_method_top1(_pipeline(root, DEEPEST, s), method) for s in SEEDS]
            else:
                values[method] = [_top1(root / "optim" / f"{opt}-{method}" / f"s{s}") for s in SEEDS]
        for method in METHODS:
            diff = "" if method == "repopt" else _paired_or_dash(values["repopt"], values[method])
            print(_row(f"{opt} | {method}", values[method], [diff]))
    print()


def learning_rate(root: Path) -> None:
    sgd = DEFAULTS["sgd"]
    lr = scaled_lr(sgd.lr_base, SIZES["batch_size"], sgd.scaling)  # what the depth runs used
    print(f"## 6. The learning rate on {DEEPEST}: the paper's ({lr:g} at batch {SIZES['batch_size']}) vs {OLD_LR:g}\n")
    print(f"| method | peak lr | top-1 per seed {', '.join(map(str, SEEDS))} (%) | mean ± s.e. (%) | paired: "
          f"repopt - repvgg |")
    print("|---|---|---|---|---|")
    values = {}
    for label, runs in ((f"{lr:g}", lambda m: [_method_top1(_pipeline(root, DEEPEST, s), m) for s in SEEDS]),
                        (f"{OLD_LR:g}", lambda m: [_top1(root / "lr" / f"{m}-lr{OLD_LR}" / f"s{s}") for s in SEEDS])):
        for method in ("repopt", "repvgg"):
            values[label, method] = runs(method)
        diff = _paired_or_dash(values[label, "repopt"], values[label, "repvgg"])
        print(_row(f"repopt | {label}", values[label, "repopt"], [diff]))
        print(_row(f"repvgg | {label}", values[label, "repvgg"], [""]))
    for method in ("repopt", "repvgg"):
        cell = _paired_or_dash(values[f"{lr:g}", method], values[f"{OLD_LR:g}", method])
        print(f"\n{method}: lr {lr:g} - lr {OLD_LR:g}, paired by seed: {cell}", end="")
    print("\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/fmnist")
    ap.add_argument("--only", type=int, choices=range(1, 7), default=None, help="print only table N")
    args = ap.parse_args()
    root = Path(args.root)
    s = SIZES
    print(f"Fashion-MNIST, training subset {s['train_subset']} of 60,000 (class-balanced, fixed), full 10,000-image "
          f"test set, 28x28, {s['epochs']} epochs (hyper-search {s['hs_epochs']}), batch {s['batch_size']}, the "
          f"recipe of app/recipes.py for every method; seeds {', '.join(map(str, SEEDS))}.\n")
    for n, table in enumerate((depth, ablations, transfer, int8, optimizers, learning_rate), start=1):
        if args.only in (None, n):
            table(root)


if __name__ == "__main__":
    main()
