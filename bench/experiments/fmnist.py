"""The Fashion-MNIST experiments of docs/results.md, every run from one command; re-running resumes.

    python bench/experiments/fmnist.py run --root runs/fmnist            # all runs, 2 at a time, 1 torch thread each
    python bench/experiments/fmnist.py list --root runs/fmnist           # the commands, and which are done
    python bench/experiments/tables.py --root runs/fmnist                # the tables, from the runs' own files

Every run is a `repopt` command (printed by `list`, logged under ROOT/logs/); a finished run is skipped, a stopped one
resumes from its last epoch. Runs start in the order below once the runs they need are done, so the central
results (the deepest net) come first. Sizes (SIZES) are what a shared 2-core CPU allowed; they are stated in the docs.

  depth/NET/sS       `repopt pipeline`: hyper-search, then repopt / repvgg / plain, same recipe and budget   (exp. 1)
  ablation/V/sS      Table 4 on the deepest net: --no-reinit, --no-mask, --scales ones (plain: depth/)      (exp. 2)
  transfer/sS        scales searched on the embedded digits, RepOpt trained on Fashion-MNIST              (exp. 3)
  int8/NET/sS/M-Q    `repopt quantize` per-channel and per-tensor; analyze/NET/sS.json: Table 11 stats    (exp. 4)
  optim/OPT-M/sS     AdamW and Lion with the same scales (repopt), and the baselines with them            (exp. 5)
  lr/M-lr0.1/sS      repopt and repvgg at the earlier default lr 0.1 at batch 64 (4x the paper's rate)    (the recipe)
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SEEDS = (0, 1, 2)
NETS = ("repopt_vgg_l0", "repopt_vgg_a0", "repopt_vgg_tiny")  # deepest first: it carries experiments 2-5
DEEPEST = NETS[0]
SIZES = {  # one recipe for every method: recipes.py defaults (0.1 per 256 images -> 0.025 at batch 64, wd 4e-5, ...)
    "dataset": "fashion-mnist", "train_subset": 10000, "epochs": 5, "hs_epochs": 5, "batch_size": 64,
    # the digits search of exp. 3 sees as many images as the Fashion-MNIST search (35 x 1,437 ~ 5 x 10,000)
    "digits_hs_epochs": 35,
}
METHODS = ("repopt", "repvgg", "plain")
OLD_LR = 0.1  # repopt's default before the paper's per-256 recipe: 0.1 at any batch


def common_args() -> list[str]:
    s = SIZES
    return ["--dataset", s["dataset"], "--train-subset", str(s["train_subset"]), "--epochs", str(s["epochs"]),
            "--batch-size", str(s["batch_size"]), "--eval-every", str(s["epochs"]), "--quiet"]


@dataclass
class Job:
    name: str                       # also its path under ROOT
    argv: list[str]                 # `repopt ARGV`
    done: str                       # file (under ROOT) whose presence means finished
    needs: list[str] = field(default_factory=list)  # files (under ROOT) that must exist first
    stdout: str | None = None       # where the command's stdout goes (JSON outputs), written when it succeeds


def jobs(root: Path) -> list[Job]:
    r = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    out: list[Job] = []
    for net in NETS:  # exp. 1: the pipeline per net and seed
        for s in SEEDS:
            d = f"depth/{net}/s{s}"
            out.append(Job(d, ["pipeline", "--arch", net, *common_args(), "--hs-epochs", str(SIZES["hs_epochs"]),
                               "--no-int8", "--seed", str(s), "--out", r(d)], f"{d}/report.json"))
        if net != DEEPEST:
            continue
        for s in SEEDS:  # exp. 2 on the deepest net, with each seed's own searched scales
            scales = f"depth/{net}/s{s}/search/scales.safetensors"
            for variant, extra, needs in (("no-reinit", ["--scales", r(scales), "--no-reinit"], [scales]),
                                          ("no-mask", ["--scales", r(scales), "--no-mask"], [scales]),
                                          ("ones", ["--scales", "ones"], [])):
                d = f"ablation/{variant}/s{s}"
                out.append(Job(d, ["train", "--method", "repopt", "--arch", net, *common_args(), *extra, "--seed",
                                   str(s), "--out", r(d)], f"{d}/result.json", needs))
        for s in SEEDS:  # exp. 3: search on the digits, train on Fashion-MNIST
            hs = f"transfer/digits-search/s{s}"
            out.append(Job(hs, ["search", "--arch", net, "--dataset", "digits", "--epochs",
                                str(SIZES["digits_hs_epochs"]), "--batch-size", str(SIZES["batch_size"]),
                                "--eval-every", str(SIZES["digits_hs_epochs"]), "--quiet", "--seed", str(s),
                                "--out", r(hs)], f"{hs}/result.json"))
            d = f"transfer/repopt/s{s}"
            out.append(Job(d, ["train", "--method", "repopt", "--arch", net, *common_args(), "--scales",
                               r(hs, "scales.safetensors"), "--seed", str(s), "--out", r(d)], f"{d}/result.json",
                           [f"{hs}/scales.safetensors"]))
        for opt in ("adamw", "lion"):  # exp. 5, RepOpt first
            for s in SEEDS:
                scales = f"depth/{net}/s{s}/search/scales.safetensors"
                d = f"optim/{opt}-repopt/s{s}"
                out.append(Job(d, ["train", "--method", "repopt", "--optimizer", opt, "--arch", net, *common_args(),
                                   "--scales", r(scales), "--seed", str(s), "--out", r(d)], f"{d}/result.json",
                               [scales]))
        for s in SEEDS:  # the recipe: the earlier default (lr 0.1 absolute at batch 64), everything else equal
            scales = f"depth/{net}/s{s}/search/scales.safetensors"
            for method, extra, needs in (("repopt", ["--scales", r(scales)], [scales]), ("repvgg", [], [])):
                d = f"lr/{method}-lr{OLD_LR}/s{s}"
                out.append(Job(d, ["train", "--method", method, "--arch", net, *common_args(), *extra, "--lr",
                                   str(OLD_LR), "--seed", str(s), "--out", r(d)], f"{d}/result.json", needs))
        out += _int8_jobs(root, net)
    for net in NETS[1:]:
        out += _int8_jobs(root, net)
    for opt in ("adamw", "lion"):  # exp. 5's baselines: last, they only give the table its context
        for method in ("repvgg", "plain"):
            for s in SEEDS:
                d = f"optim/{opt}-{method}/s{s}"
                out.append(Job(d, ["train", "--method", method, "--optimizer", opt, "--arch", DEEPEST,
                                   *common_args(), "--seed", str(s), "--out", r(d)], f"{d}/result.json"))
    return out


def _int8_jobs(root: Path, net: str) -> list[Job]:
    out = []
    for s in SEEDS:
        run = f"depth/{net}/s{s}"
        for method in METHODS:
            for q, extra in (("per-channel", []), ("per-tensor", ["--per-tensor"])):
                name = f"int8/{net}/s{s}/{method}-{q}"
                out.append(Job(name, ["quantize", str(root / run / method), *extra, "--threads", "1", "--repeats",
                                      "3", "--json"], f"{name}.json", [f"{run}/report.json"], f"{name}.json"))
        name = f"analyze/{net}/s{s}"
        out.append(Job(name, ["analyze", *(str(root / run / m) for m in METHODS), "--json"], f"{name}.json",
                       [f"{run}/report.json"], f"{name}.json"))
    return out


def _start(job: Job, root: Path, nice: int = 5) -> subprocess.Popen:
    log = root / "logs" / f"{job.name.replace('/', '__')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "repopt", *job.argv]
    logf = open(log, "a")
    logf.write(f"$ {shlex.join(cmd)}\n")
    logf.flush()
    stdout = logf
    if job.stdout:
        tmp = root / f"{job.stdout}.part"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        stdout = open(tmp, "w")
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=logf, env=env)
    proc.job, proc.logf, proc.started = job, logf, time.time()  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, root: Path) -> bool:
    job = proc.job  # type: ignore[attr-defined]
    ok = proc.returncode == 0
    if job.stdout:
        tmp = root / f"{job.stdout}.part"
        if ok:
            os.replace(tmp, root / job.stdout)  # the JSON appears whole, or not at all
        elif tmp.exists():
            tmp.unlink()
    proc.logf.write(f"# exit {proc.returncode} after {time.time() - proc.started:.0f} s\n")  # type: ignore
    proc.logf.close()  # type: ignore[attr-defined]
    return ok


def run(root: Path, parallel: int, only: str | None, all_jobs: list[Job] | None = None, nice: int = 5) -> int:
    """Run `all_jobs` (default: this study's) that are not done, `parallel` at a time, in their order."""
    all_jobs = jobs(root) if all_jobs is None else all_jobs
    todo = [j for j in all_jobs if not (root / j.done).exists() and (only is None or j.name.startswith(only))]
    running: list[subprocess.Popen] = []
    failed: list[str] = []
    print(f"{len(todo)} runs to do under {root}, {parallel} at a time", flush=True)
    while todo or running:
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            ok = _finish(p, root)
            print(f"{time.strftime('%H:%M:%S')} {'done' if ok else 'FAILED'} {p.job.name} "  # type: ignore
                  f"({time.time() - p.started:.0f} s)", flush=True)  # type: ignore[attr-defined]
            if not ok:
                failed.append(p.job.name)  # type: ignore[attr-defined]
        blocked = set(failed)
        ready = [j for j in todo if all((root / n).exists() for n in j.needs)
                 and not any(n.startswith(f + "/") for f in blocked for n in j.needs)]
        # a job whose inputs come from a failed run can never start: drop it
        todo = [j for j in todo if not any(n.startswith(f + "/") for f in blocked for n in j.needs)]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            todo.remove(job)
            print(f"{time.strftime('%H:%M:%S')} start {job.name}", flush=True)
            running.append(_start(job, root, nice))
        if not running and todo and not ready:
            print(f"{len(todo)} runs wait for inputs that no run will make: {todo[0].needs}", flush=True)
            break
        time.sleep(5)
    print(f"finished; {len(failed)} failed: {failed}" if failed else "finished", flush=True)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "list"])
    ap.add_argument("--root", default="runs/fmnist", help="where the runs go (default runs/fmnist)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    ap.add_argument("--only", default=None, help="only the runs whose name starts with this, e.g. depth/")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    if args.action == "list":
        for j in jobs(root):
            mark = "done" if (root / j.done).exists() else "    "
            print(f"{mark}  {j.name}: repopt {shlex.join(j.argv)}" + (f" > {j.stdout}" if j.stdout else ""))
        return 0
    return run(root, args.parallel, args.only)


if __name__ == "__main__":
    sys.exit(main())
