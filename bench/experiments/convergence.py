"""Does RepOpt's lead survive full training? The schedule sweep of docs/results.md section 'Convergence'.

    python bench/experiments/convergence.py run --root runs/convergence     # every run, 2 at a time; re-run resumes
    python bench/experiments/convergence.py list --root runs/convergence    # the commands, and which are done
    python bench/experiments/convergence_tables.py --root runs/convergence  # the tables and the figure

The same recipe for every method (recipes.py: 0.1 per 256 images, cosine, warmup 5/120 of the run), the same two
nets as section 1 (22 and 48 layers), three schedule lengths, three seeds. Each seed's hyper-search runs once, on the
same training subset, and its scales serve RepOpt at every length (a user searches once, then trains). Every run
tests on the whole test split; the 45-epoch runs every third epoch, the others every epoch, so that
convergence.py's curves give time-to-accuracy. The runner (start order, logs, resume) is fmnist.py's.

Sizes (SIZES): chosen from throughput measured with one torch thread on this 2-core CPU (docs/results.md states the
figures): 16x16 images and a 5,000-image class-balanced subset make the 45-epoch schedule of the 48-layer net affordable
(~4 minutes a run); 28x28 on 10,000 images would take about 5x as long.

  hs/NET/sS                 `repopt search`, SIZES["hs_epochs"] epochs
  sched/NET/eE/METHOD/sS    `repopt train`: repopt (with hs/NET/sS's scales), repvgg, plain; E in LENGTHS
  ablation/V/sS             Table 4 at the longest schedule on the 48-layer net: --no-reinit, --no-mask, --scales ones
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fmnist import Job, run  # noqa: E402

SEEDS = (0, 1, 2)
NETS = ("repopt_vgg_l0", "repopt_vgg_a0")  # 48 and 22 layers: the question is about depth
DEEPEST = NETS[0]
LENGTHS = (45, 15, 5)  # epochs; longest first: it decides whether the methods converge
METHODS = ("repopt", "repvgg", "plain")
SIZES = {"dataset": "fashion-mnist", "train_subset": 5000, "image_size": 16, "batch_size": 64,
         # the search sees 50,000 images, as section 1's did (5 epochs of 10,000)
         "hs_epochs": 10}


def eval_every(epochs: int) -> int:
    return 3 if epochs > 15 else 1


def data_args() -> list[str]:
    s = SIZES
    return ["--dataset", s["dataset"], "--train-subset", str(s["train_subset"]), "--image-size",
            str(s["image_size"]), "--batch-size", str(s["batch_size"]), "--quiet"]


def sched_dir(net: str, epochs: int, method: str, seed: int) -> str:
    return f"sched/{net}/e{epochs}/{method}/s{seed}"


def hs_dir(net: str, seed: int) -> str:
    return f"hs/{net}/s{seed}"


def jobs(root: Path) -> list[Job]:
    r = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    out: list[Job] = []
    for net in NETS:
        for s in SEEDS:
            d = hs_dir(net, s)
            out.append(Job(d, ["search", "--arch", net, *data_args(), "--epochs", str(SIZES["hs_epochs"]),
                               "--eval-every", str(SIZES["hs_epochs"]), "--seed", str(s), "--out", r(d)],
                           f"{d}/result.json"))
    longest = LENGTHS[0]
    for epochs in LENGTHS:
        for net in NETS:
            for s in SEEDS:
                scales = f"{hs_dir(net, s)}/scales.safetensors"
                for method in METHODS:
                    d = sched_dir(net, epochs, method, s)
                    extra, needs = (["--scales", r(scales)], [scales]) if method == "repopt" else ([], [])
                    out.append(Job(d, ["train", "--method", method, "--arch", net, *data_args(), "--epochs",
                                       str(epochs), "--eval-every", str(eval_every(epochs)), *extra, "--seed",
                                       str(s), "--out", r(d)], f"{d}/result.json", needs))
        if epochs != longest:
            continue
        for s in SEEDS:  # Table 4 at the longest schedule, each seed with its own searched scales
            scales = f"{hs_dir(DEEPEST, s)}/scales.safetensors"
            for variant, extra, needs in (("no-reinit", ["--scales", r(scales), "--no-reinit"], [scales]),
                                          ("no-mask", ["--scales", r(scales), "--no-mask"], [scales]),
                                          ("ones", ["--scales", "ones"], [])):
                d = f"ablation/{variant}/s{s}"
                out.append(Job(d, ["train", "--method", "repopt", "--arch", DEEPEST, *data_args(), "--epochs",
                                   str(longest), "--eval-every", str(eval_every(longest)), *extra, "--seed",
                                   str(s), "--out", r(d)], f"{d}/result.json", needs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "list"])
    ap.add_argument("--root", default="runs/convergence", help="where the runs go (default runs/convergence)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    ap.add_argument("--only", default=None, help="only the runs whose name starts with this, e.g. sched/")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    if args.action == "list":
        for j in jobs(root):
            mark = "done" if (root / j.done).exists() else "    "
            print(f"{mark}  {j.name}: repopt {shlex.join(j.argv)}")
        return 0
    return run(root, args.parallel, args.only, jobs(root))


if __name__ == "__main__":
    sys.exit(main())
