"""The convergence sweep of convergence.py on one GPU, sized to a time budget: calibrate, plan, run, summarise.

    bash bench/experiments/gpu_science.sh --data-dir data/fashion-mnist    # on the GPU; one JSON summary at the end
    bash bench/experiments/gpu_science.sh --cpu                            # toy size on CPU, digits (CI runs this)

The study is section 'Convergence' of docs/results.md at full size: all 60,000 Fashion-MNIST training images at
28x28, the whole test split, the same two nets (22 and 48 layers), three methods, three seeds, one hyper-search per
seed, Table 4 at the longest schedule; batch 256, so the recipe's 0.1 per 256 images is the peak rate itself.

1. calibrate: every worker process trains the same (net, method) at once, for every pair, so the images/s measured
   are those of a busy GPU, as the sweep will see it (repopt.app.bench's interleaved training steps, synchronised);
2. plan: the longest schedule L in CANDIDATES whose predicted time, schedules (L, L/3, L/9) plus searches, ablations,
   evaluation and per-run start-up, fits the budget left; printed as one JSON line before any run starts;
3. run: `repopt` commands in-process in the workers (no interpreter start per run), seed by seed so that a run cut
   short still holds whole seeds; one JSON line per finished run; nothing new starts after the budget;
4. summarise: the tables of convergence_tables.py from the run files, as one JSON object (the last line printed).

Device data: the device machine reaches no network, so the four IDX files travel with the working tree (copy
/usr/share/datasets/fashion-mnist/*.gz to data/fashion-mnist/, 30 MB, and carry that path).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from convergence import Study, jobs  # noqa: E402

from repopt._io import write_text  # noqa: E402

CANDIDATES = (45, 36, 27, 18, 12, 9, 6, 3)   # longest schedules tried, largest first
TOY_CANDIDATES = (2,)  # schedules (2, 1): the least that still has a longer and a shorter run
MARGIN = 0.8              # plan to use this fraction of the budget left: the rest absorbs the estimate's error
EVAL_COST = 1 / 3         # a test image costs about a third of a training image (forward only)
START_S = 3.0             # per run: build the model, load the data, first-step compiles (seconds, on one worker)


def gpu_study(data_dir: str | None) -> Study:
    return Study(train_subset=None, image_size=28, batch_size=256, data_dir=data_dir, lengths=(45, 15, 5),
                 hs_epochs=5)


def toy_study() -> Study:
    return Study(dataset="digits", train_subset=128, image_size=16, batch_size=32, lengths=(2, 1), seeds=(0, 1),
                 hs_epochs=1)


def _schedule(longest: int) -> tuple[int, ...]:
    return tuple(sorted({longest, max(1, round(longest / 3)), max(1, round(longest / 9))}, reverse=True))


# ---- work done in the worker processes -------------------------------------------------------------------------------
def _calibrate(net: str, method: str, st: Study, device: str, repeats: int) -> dict:
    import torch

    from repopt.app.bench.training import training_steps

    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    t0 = time.perf_counter()
    r = training_steps(net, st.image_size, st.batch_size, repeats, methods=(method,), num_classes=10,
                       device=device, sync=sync)
    return {"seconds_per_image": r[method]["median_s"] / st.batch_size, "wall_s": time.perf_counter() - t0}


def _run(argv: list[str], log: str) -> int:
    from repopt.app.cli import main

    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            return main(argv)
        except SystemExit as e:
            return int(e.code or 0)
        except Exception as e:  # one run's failure is reported, the sweep goes on
            print(f"{type(e).__name__}: {e}", file=f)
            return 1


# ---- the driver ------------------------------------------------------------------------------------------------------
def _say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def calibrate(pool, st: Study, device: str, workers: int, repeats: int) -> dict:
    """Seconds per training image of each (net, method) with every worker busy on it (the GPU shared W ways), per
    worker: the sweep's cost model divides by the number of workers."""
    out = {}
    for net in st.nets:
        for method in st.methods:
            got = pool.starmap(_calibrate, [(net, method, st, device, repeats)] * workers)
            out.setdefault(net, {})[method] = max(g["seconds_per_image"] for g in got)
    return out


def predict(st: Study, cost: dict, train_images: int, test_images: int, workers: int) -> float:
    """Seconds the sweep would take on `workers` busy workers (cost: seconds per image per worker)."""
    total, runs = 0.0, 0
    for net in st.nets:
        c = cost[net]
        for _ in st.seeds:
            total += st.hs_epochs * train_images * c["repvgg"]  # the HS model costs about a RepVGG step (assumed)
            runs += 1
            for epochs in st.lengths:
                for m in st.methods:
                    tests = epochs // st.eval_every(epochs) + 1
                    total += epochs * train_images * c[m] + tests * test_images * c[m] * EVAL_COST
                    runs += 1
    abl = 3 * len(st.seeds)
    total += abl * st.longest * train_images * cost[st.deepest]["repopt"]
    return (total + (runs + abl) * START_S) / workers


def plan(base: Study, cost: dict, train_images: int, test_images: int, workers: int, seconds: float,
         candidates: tuple[int, ...] = CANDIDATES) -> Study:
    for longest in candidates:
        st = replace(base, lengths=_schedule(longest), hs_epochs=max(1, round(longest / 9)))
        if predict(st, cost, train_images, test_images, workers) <= seconds:
            return st
    return replace(base, lengths=_schedule(candidates[-1]), hs_epochs=1)


def _order(all_jobs: list, st: Study) -> list:
    """Searches first, then seed by seed (shortest schedule first), Table 4 last: a sweep cut short holds whole
    seeds."""
    def key(j):
        parts = j.name.split("/")
        if parts[0] == "hs":
            return (0, 0, 0)
        if parts[0] == "sched":
            return (1, int(parts[4][1:]), int(parts[2][1:]))
        return (2, int(parts[2][1:]), 0)
    return sorted(all_jobs, key=key)


def sweep(pool, workers: int, st: Study, root: Path, device: str, deadline: float, hard_stop: float) -> dict:
    """Run the study's unfinished jobs, `workers` at a time; none starts after `deadline` (but the first wave always
    does), and at `hard_stop` the runs still going are cut once one has finished (their checkpoints let a later call
    resume them; the shell script's timeout bounds the wait for the first)."""
    todo = [j for j in _order(jobs(root, st), st) if not (root / j.done).exists()]
    running, failed, finished, started = {}, [], 0, 0
    while todo or running:
        for name, (job, res, t0) in list(running.items()):
            if res.ready():
                del running[name]
                rc = res.get()
                r = root / job.done
                top1 = json.loads(r.read_text()).get("top1") if rc == 0 and r.is_file() else None
                finished += rc == 0
                if rc:
                    failed.append(name)
                _say({"run": name, "rc": rc, "top1": top1, "seconds": round(time.time() - t0, 1)})
        now = time.time()
        if now > hard_stop and running and finished:  # a sweep that has finished nothing waits for its first
            pool.terminate()
            break
        if now < deadline or not started:
            blocked = [f + "/" for f in failed]
            todo = [j for j in todo if not any(n.startswith(b) for b in blocked for n in j.needs)]
            ready = [j for j in todo if all((root / n).exists() for n in j.needs)]
            for j in ready[:max(0, workers - len(running))]:
                todo.remove(j)
                log = str(root / "logs" / f"{j.name.replace('/', '__')}.log")
                running[j.name] = (j, pool.apply_async(_run, ([*j.argv, "--device", device], log)), time.time())
                started += 1
        elif not running:
            break
        time.sleep(0.5)
    return {"finished": finished, "failed": failed, "cut": sorted(running), "not_started": [j.name for j in todo]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="toy size on CPU (digits): checks the machinery")
    ap.add_argument("--device", default=None, help="default cuda, or cpu with --cpu")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST's IDX files (default: the Debian package's)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole script (default 300; 60 "
                    "with --cpu)")
    ap.add_argument("--workers", type=int, default=None, help="runs at a time (default 6 on a GPU, 2 with --cpu)")
    ap.add_argument("--root", default="runs/gpu-science")
    args = ap.parse_args()
    start = time.time()
    device = args.device or ("cpu" if args.cpu else "cuda")
    budget = args.budget_s or (60.0 if args.cpu else 300.0)
    workers = args.workers or (2 if args.cpu else 6)
    base = toy_study() if args.cpu else gpu_study(args.data_dir)
    root = Path(args.root).resolve()
    from repopt.data import load_dataset

    ds = load_dataset(base.dataset, base.data_dir, base.image_size, train_subset=base.train_subset)
    train_images, test_images = ds.num_train, ds.num_test
    info = {"device": device, "budget_s": budget, "workers": workers, "train_images": train_images,
            "test_images": test_images}
    if device.startswith("cuda"):
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    with mp.get_context("spawn").Pool(workers) as pool:
        cost = calibrate(pool, base, device, workers, repeats=3 if args.cpu else 20)
        left = budget - (time.time() - start)
        st = plan(base, cost, train_images, test_images, workers, MARGIN * left,
                  TOY_CANDIDATES if args.cpu else CANDIDATES)
        st.save(root)
        predicted = predict(st, cost, train_images, test_images, workers)
        _say({"plan": {**info, "lengths": st.lengths, "hs_epochs": st.hs_epochs, "predicted_s": round(predicted),
                       "seconds_per_image_per_worker": cost, "calibration_s": round(time.time() - start)}})
        status = sweep(pool, workers, st, root, device, start + budget, start + 1.25 * budget)
    from convergence_tables import tables

    out: dict = {}
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tables(root, out)
    write_text(root / "tables.md", text.getvalue())
    _say({"summary": {**info, "lengths": st.lengths, "predicted_s": round(predicted),
                      "elapsed_s": round(time.time() - start), **status, "tables": out}})
    return 1 if status["failed"] or not status["finished"] else 0


if __name__ == "__main__":
    sys.exit(main())
