"""Fine-tuning from trained weights: the transfer experiment of issue 21 on Fashion-MNIST (docs/results.md section 11).

    python bench/experiments/transfer.py run --root runs/transfer       # every run, 2 at a time; re-run resumes
    python bench/experiments/transfer.py list --root runs/transfer      # the commands, and which are done
    python bench/experiments/transfer.py table --root runs/transfer     # the table, from the runs' own files

Pre-train on classes 0-4 (Study.pretrain_classes: 30,000 training images), fine-tune on classes 5-9 from a small
class-balanced subset (Study.subset), test on the whole test split of those classes, then INT8 (`repopt quantize`,
per-channel and per-tensor). Rows, each over Study.seeds (paired by seed: the same subset, data order and recipe):

  ft/repopt       RepOpt fine-tuned with its multipliers: --init-from pre/repopt, the pre-training search's scales,
                  no rule of initialization (masks only)
  ft/plain        the same weights fine-tuned without them (plain SGD: RepOpt with --no-mask is refused as exactly this)
  ft/repvgg       RepVGG fine-tuned multi-branch from pre/repvgg, then fused (its result's deployed_top1)
  scratch/METHOD  repopt / repvgg / plain trained from scratch on the small subset, same epochs, the default recipe
  ft-default/M    diagnostic, after the main rows: ft/M again with the from-scratch recipe instead of BiT's (repopt
                  with its multipliers and plain SGD from RepOpt's weights, repvgg from its own): does the recipe or
                  the start decide? No INT8

Fine-tuning uses `--recipe finetune` (BiT-HyperRule's optimizer, app/recipes.py) for 100,000 images seen
(Study.finetune_epochs x Study.subset): 0.4x BiT's length below 20,000 images (500 steps of 512), to fit the study in
about two hours of one shared core beside the convergence study (1,600 steps of 64 images: still 3x BiT's step
count); the classifier has 5 outputs on both halves, so it is
loaded with the rest (timm's convention: a head of the same size is kept). The runner (start order, logs, resume) is
fmnist.py's. Sizes are chosen for a shared 2-core CPU like convergence.py's (16x16 images), from its measured
throughput (repopt_vgg_a0 at 16x16, one thread: 830-955 images/s plain, 609-694 RepVGG).

  hs/sS                 `repopt search` on the pre-training classes
  pre/METHOD/sS         `repopt train` on the pre-training classes: repopt (hs/sS's scales), repvgg
  ft/ROW/sS, scratch/METHOD/sS, int8/ROW/sS-Q, ft-default/METHOD/sS
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from fmnist import Job, run  # noqa: E402
from recorded import Recorded  # noqa: E402
from stats import mean_se, paired, paired_cell  # noqa: E402



@dataclass(frozen=True)
class Study(Recorded):
    """What the experiment runs; saved as ROOT/study.json so that the table reads the study the runs belong to."""
    net: str = "repopt_vgg_a0"              # 22 layers: section 1's middle net, where plain SGD lags
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int = 16
    batch_size: int = 64
    pretrain_classes: str = "0-4"
    finetune_classes: str = "5-9"
    pretrain_epochs: int = 5                # 150,000 images: as many as section 1's 5 epochs of 10,000, x3
    hs_epochs: int = 5
    subset: int = 1000                      # the 500-2,000 images
    finetune_epochs: int = 100              # 100,000 images seen: 0.4x BiT-HyperRule's length below 20,000 images

    def args(self, classes: str) -> list[str]:
        out = ["--arch", self.net, "--dataset", self.dataset, "--image-size", str(self.image_size), "--batch-size",
               str(self.batch_size), "--classes", classes, "--quiet"]
        return out + (["--data-dir", self.data_dir] if self.data_dir else [])

    def finetune_args(self) -> list[str]:
        e = self.finetune_epochs
        return [*self.args(self.finetune_classes), "--train-subset", str(self.subset), "--epochs", str(e),
                "--eval-every", str(max(1, e // 16))]


DEFAULT = Study()
ROWS = ("ft/repopt", "ft/plain", "ft/repvgg", "scratch/repopt", "scratch/repvgg", "scratch/plain")
DIAGNOSTIC = ("ft-default/repopt", "ft-default/plain", "ft-default/repvgg")  # fine-tuned with the from-scratch recipe
PAIRS = (("ft/repopt", "ft/plain", "the multipliers, BiT recipe"),
         ("ft-default/repopt", "ft-default/plain", "the multipliers, from-scratch recipe"),
         ("ft/repopt", "ft/repvgg", "RepOpt vs RepVGG, both fine-tuned, BiT recipe"),
         ("ft-default/repopt", "ft-default/repvgg", "RepOpt vs RepVGG, both fine-tuned, from-scratch recipe"),
         ("ft-default/repopt", "scratch/repopt", "pre-training, RepOpt"),
         ("ft-default/plain", "scratch/plain", "pre-training, plain SGD"),
         ("ft-default/repopt", "ft/repopt", "the recipe"))
QUANT = {"per-channel": [], "per-tensor": ["--per-tensor"]}


def jobs(root: Path, study: Study = DEFAULT) -> list[Job]:
    r = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    st, out = study, []
    for s in st.seeds:
        hs, scales = f"hs/s{s}", f"hs/s{s}/scales.safetensors"
        out.append(Job(hs, ["search", *st.args(st.pretrain_classes), "--epochs", str(st.hs_epochs), "--eval-every",
                            str(st.hs_epochs), "--seed", str(s), "--out", r(hs)], f"{hs}/result.json"))
        pre = {"repopt": ["--scales", r(scales)], "repvgg": []}
        for method, extra in pre.items():
            d = f"pre/{method}/s{s}"
            out.append(Job(d, ["train", "--method", method, *st.args(st.pretrain_classes), "--epochs",
                               str(st.pretrain_epochs), "--eval-every", str(st.pretrain_epochs), *extra, "--seed",
                               str(s), "--out", r(d)], f"{d}/result.json", [scales] if extra else []))
        weights = {"repopt": f"pre/repopt/s{s}/model.safetensors", "repvgg": f"pre/repvgg/s{s}/model.safetensors"}
        rows = {"ft/repopt": ("repopt", weights["repopt"], ["--scales", r(scales)]),
                "ft/plain": ("plain", weights["repopt"], []),
                "ft/repvgg": ("repvgg", weights["repvgg"], [])}
        for row, (method, source, extra) in rows.items():
            d = f"{row}/s{s}"
            out.append(Job(d, ["train", "--method", method, *st.finetune_args(), "--recipe", "finetune",
                               "--init-from", r(source), *extra, "--seed", str(s), "--out", r(d)], f"{d}/result.json",
                           [source, *([scales] if extra else [])]))
        for method in ("repopt", "repvgg", "plain"):
            d = f"scratch/{method}/s{s}"
            extra = ["--scales", r(scales)] if method == "repopt" else []
            out.append(Job(d, ["train", "--method", method, *st.finetune_args(), *extra, "--seed", str(s), "--out",
                               r(d)], f"{d}/result.json", [scales] if extra else []))
        for row in ROWS:
            for q, extra in QUANT.items():
                name = f"int8/{row}/s{s}-{q}"
                out.append(Job(name, ["quantize", r(f"{row}/s{s}"), *extra, "--threads", "1", "--repeats", "3",
                                      "--json"], f"{name}.json", [f"{row}/s{s}/result.json"], f"{name}.json"))
    for s in st.seeds:  # after every seed's main rows: is it the weights or the fine-tuning recipe that lags scratch?
        scales = f"hs/s{s}/scales.safetensors"
        for row, method, extra in (("ft-default/repopt", "repopt", ["--scales", r(scales)]),
                                   ("ft-default/plain", "plain", []), ("ft-default/repvgg", "repvgg", [])):
            source = f"pre/{'repvgg' if method == 'repvgg' else 'repopt'}/s{s}/model.safetensors"
            d = f"{row}/s{s}"
            out.append(Job(d, ["train", "--method", method, *st.finetune_args(), "--init-from", r(source), *extra,
                               "--seed", str(s), "--out", r(d)], f"{d}/result.json",
                           [source, *([scales] if extra else [])]))
    return out


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def table(root: Path, study: Study) -> str:
    """The transfer table: deployed top-1 and INT8 top-1 per row (mean ± standard error over seeds), and each row's
    paired difference to RepOpt fine-tuned with its multipliers."""
    def column(row: str, key: str, q: str | None = None) -> list[float | None]:
        files = [_json(root / (f"int8/{row}/s{s}-{q}.json" if q else f"{row}/s{s}/result.json")) for s in study.seeds]
        return [f[key] if f else None for f in files]

    lines = [f"{study.net}, pre-trained on classes {study.pretrain_classes} of {study.dataset}, fine-tuned on "
             f"{study.finetune_classes} from {study.subset} images for {study.finetune_epochs} epochs "
             f"({study.image_size}x{study.image_size}, seeds {', '.join(map(str, study.seeds))})", "",
             "| row | deployed top-1 (%) | vs ft/repopt | INT8 per-channel | INT8 per-tensor |",
             "|---|---|---|---|---|"]
    base = column("ft/repopt", "deployed_top1")
    for row in ROWS + DIAGNOSTIC:
        top1 = column(row, "deployed_top1")
        cells = []
        for values in (top1, column(row, "int8_top1", "per-channel"), column(row, "int8_top1", "per-tensor")):
            done = [v for v in values if v is not None]
            cells.append(mean_se(done) + (f" (n={len(done)})" if len(done) != len(values) else "") if done else "-")
        pairs = [(a, b) for a, b in zip(top1, base) if a is not None and b is not None]
        vs = "-" if row == "ft/repopt" or not pairs else paired_cell(paired(*map(list, zip(*pairs))))
        lines.append(f"| {row} | {cells[0]} | {vs} | {cells[1]} | {cells[2]} |")
    lines.append("")
    for a, b, what in PAIRS:
        pairs = [(x, y) for x, y in zip(column(a, "deployed_top1"), column(b, "deployed_top1"))
                 if x is not None and y is not None]
        cell = paired_cell(paired(*map(list, zip(*pairs)))) if pairs else "-"
        lines.append(f"{a} - {b} ({what}), paired by seed: {cell}")
    lines.append("")
    for method in ("repopt", "repvgg"):  # what the fine-tuned rows start from, on the pre-training classes' test split
        done = [v for v in column(f"pre/{method}", "deployed_top1") if v is not None]
        lines.append(f"pre/{method} (classes {study.pretrain_classes}, deployed): " + (mean_se(done) if done else "-"))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "list", "table"])
    ap.add_argument("--root", default="runs/transfer", help="where the runs go (default runs/transfer)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    ap.add_argument("--only", default=None, help="only the runs whose name starts with this, e.g. ft/")
    ap.add_argument("--nice", type=int, default=5, help="niceness of the runs (default 5)")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    if args.action == "table":
        print(table(root, Study.load(root)))
        return 0
    if args.action == "list":
        for j in jobs(root, Study.load(root)):
            mark = "done" if (root / j.done).exists() else "    "
            print(f"{mark}  {j.name}: repopt {shlex.join(j.argv)}" + (f" > {j.stdout}" if j.stdout else ""))
        return 0
    DEFAULT.save(root)
    return run(root, args.parallel, args.only, jobs(root, DEFAULT), args.nice)


if __name__ == "__main__":
    sys.exit(main())
