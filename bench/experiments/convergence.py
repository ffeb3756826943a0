"""Does RepOpt's lead survive full training? The schedule sweep of docs/results.md section 'Convergence'.

    python bench/experiments/convergence.py run --root runs/convergence     # every run, 2 at a time; re-run resumes
    python bench/experiments/convergence.py list --root runs/convergence    # the commands, and which are done
    python bench/experiments/convergence_tables.py --root runs/convergence  # the tables and the figure

The same recipe for every method (recipes.py: 0.1 per 256 images, cosine, warmup 5/120 of the run), the same two
nets as section 1 (22 and 48 layers), three schedule lengths, three seeds. Each seed's hyper-search runs once, on the
same training subset, and its scales serve RepOpt at every length (a user searches once, then trains). Every run
tests on the whole test split (Study.eval_every: about 15 points per curve), so that
convergence.py's curves give time-to-accuracy. The runner (start order, logs, resume) is fmnist.py's.

Sizes (Study): chosen from throughput measured with one torch thread on this 2-core CPU (docs/results.md states the
figures): 16x16 images and a 5,000-image class-balanced subset make the 45-epoch schedule of the 48-layer net affordable
(30 epochs: ~4 minutes a run on a quiet core); 28x28 on 10,000 images would take about 5x as long.

  hs/NET/sS                 `repopt search`, Study.hs_epochs epochs
  sched/NET/eE/METHOD/sS    `repopt train`: repopt (with hs/NET/sS's scales), repvgg, plain; E in Study.lengths
  ablation/V/sS             Table 4 at the longest schedule (or Study.ablation_epochs) on the 48-layer net: --no-reinit, --no-mask, --scales ones
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fmnist import Job, run  # noqa: E402
from recorded import Recorded  # noqa: E402

@dataclass(frozen=True)
class Study(Recorded):
    """What the sweep runs; saved as ROOT/study.json so that the tables read the study the runs belong to."""
    nets: tuple[str, ...] = ("repopt_vgg_l0", "repopt_vgg_a0")  # 48 and 22 layers: the question is about depth
    lengths: tuple[int, ...] = (60, 30, 10, 5)  # epochs; longest first: it decides whether the methods converge
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_subset: int | None = 5000
    image_size: int = 16
    batch_size: int = 64
    hs_epochs: int = 10  # the search sees 50,000 images, as section 1's did (5 epochs of 10,000)
    methods: tuple[str, ...] = ("repopt", "repvgg", "plain")
    ablation_epochs: int | None = None  # Table 4's schedule; None: the longest. A study extended with a longer
    # schedule keeps the ablations it already ran at the earlier longest one (say so where they are reported)

    @property
    def deepest(self) -> str:
        return self.nets[0]

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def ablation_length(self) -> int:
        return self.ablation_epochs or self.longest

    def eval_every(self, epochs: int) -> int:
        """Test every epoch up to 15 epochs, then often enough for about 15 points per curve."""
        return max(1, round(epochs / 15))

    def data_args(self) -> list[str]:
        out = ["--dataset", self.dataset, "--image-size", str(self.image_size), "--batch-size",
               str(self.batch_size), "--quiet"]
        if self.data_dir:
            out += ["--data-dir", self.data_dir]
        return out + (["--train-subset", str(self.train_subset)] if self.train_subset else [])


# This machine's study: the 60-epoch schedule was added after the first sweep (30/10/5), whose Table 4 at 30 epochs
# it keeps: a 60-epoch Table 4 (nine more runs of about 6 minutes each on a quiet core) did not fit this session.
DEFAULT = Study(ablation_epochs=30)


def sched_dir(net: str, epochs: int, method: str, seed: int) -> str:
    return f"sched/{net}/e{epochs}/{method}/s{seed}"


def hs_dir(net: str, seed: int) -> str:
    return f"hs/{net}/s{seed}"


def jobs(root: Path, study: Study = DEFAULT) -> list[Job]:
    r = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    st, out = study, []
    for net in st.nets:
        for s in st.seeds:
            d = hs_dir(net, s)
            out.append(Job(d, ["search", "--arch", net, *st.data_args(), "--epochs", str(st.hs_epochs),
                               "--eval-every", str(st.hs_epochs), "--seed", str(s), "--out", r(d)],
                           f"{d}/result.json"))
    for net in st.nets:  # the deepest net's whole sweep first: it carries the question
        for epochs in st.lengths:
            for s in st.seeds:
                scales = f"{hs_dir(net, s)}/scales.safetensors"
                for method in st.methods:
                    d = sched_dir(net, epochs, method, s)
                    extra, needs = (["--scales", r(scales)], [scales]) if method == "repopt" else ([], [])
                    out.append(Job(d, ["train", "--method", method, "--arch", net, *st.data_args(), "--epochs",
                                       str(epochs), "--eval-every", str(st.eval_every(epochs)), *extra, "--seed",
                                       str(s), "--out", r(d)], f"{d}/result.json", needs))
    for s in st.seeds:  # Table 4 at its schedule (the longest unless set), each seed with its own searched scales
        scales = f"{hs_dir(st.deepest, s)}/scales.safetensors"
        for variant, extra, needs in (("no-reinit", ["--scales", r(scales), "--no-reinit"], [scales]),
                                      ("no-mask", ["--scales", r(scales), "--no-mask"], [scales]),
                                      ("ones", ["--scales", "ones"], [])):
            d = f"ablation/{variant}/s{s}"
            out.append(Job(d, ["train", "--method", "repopt", "--arch", st.deepest, *st.data_args(), "--epochs",
                               str(st.ablation_length), "--eval-every", str(st.eval_every(st.ablation_length)), *extra,
                               "--seed",
                               str(s), "--out", r(d)], f"{d}/result.json", needs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "list"])
    ap.add_argument("--root", default="runs/convergence", help="where the runs go (default runs/convergence)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    ap.add_argument("--only", default=None, help="only the runs whose name starts with this, e.g. sched/")
    ap.add_argument("--nice", type=int, default=5, help="niceness of the runs (default 5: a shared machine's other "
                    "work comes first)")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    if args.action == "list":
        for j in jobs(root):
            mark = "done" if (root / j.done).exists() else "    "
            print(f"{mark}  {j.name}: repopt {shlex.join(j.argv)}")
        return 0
    DEFAULT.save(root)
    return run(root, args.parallel, args.only, jobs(root), args.nice)


if __name__ == "__main__":
    sys.exit(main())
