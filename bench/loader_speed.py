"""How fast the streamed loader feeds a training step, on this machine.

    python bench/jpeg_folder.py /tmp/inet --classes 8 --per-class 40 --val-per-class 10
    python bench/loader_speed.py /tmp/inet [--json]

Prints (1) images/s that ONE worker process decodes and transforms at 224 (decode alone; + the paper's training
transform with and without raug15; the evaluation transform), timed in a single process on the folder's files;
(2) images/s of the DataLoader with 1 and 2 workers, end to end (normalized batches of 32 in the training process);
(3) images/s of a training step (forward + backward + RepOptSGD step) of repopt_vgg_a0 and repopt_vgg_b1 at 224 on
this CPU; and (4) the workers a GPU at the paper's B1 throughput (445 images/s, Table 2) would need per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch

PAPER_B1_IMAGES_PER_S = 445.0


def per_worker(files, transform, repeat: int = 1) -> dict:
    """images/s of one process decoding (and transforming) `files`: by the wall clock, and per CPU-second of the
    process (what a worker on a core of its own achieves, whatever else the machine runs)."""
    from repopt.data.imagefiles import open_rgb

    wall, cpu = time.perf_counter(), time.process_time()
    for r in range(repeat):
        for k, path in enumerate(files):
            img = open_rgb(path)
            if transform is not None:
                transform(img, random.Random(r * len(files) + k))
    n = repeat * len(files)
    return {"wall": n / (time.perf_counter() - wall), "cpu": n / (time.process_time() - cpu)}


def loader_rate(folder: str, workers: int, batch_size: int = 32) -> float:
    from repopt.data import load_dataset

    ds = load_dataset("folder", folder, 224, loader="stream", augment="raug15", workers=workers)
    batches = min(8, ds.steps_per_epoch(batch_size) - 1)
    it = iter(ds.train_batches(batch_size, epoch=0))
    next(it)  # worker start-up and the first prefetch are not the steady state
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        seen += x.shape[0]
    rate = seen / (time.perf_counter() - start)
    ds.close()
    return rate


def train_step_rate(arch: str, batch: int, repeats: int) -> dict:
    """images/s of a RepOpt training step (target model + RepOptSGD, as `repopt train` runs it) at 224, median of
    `repeats` after one warm-up step: by the wall clock, and per CPU-second of the process."""
    from repopt.app.bench.workloads import batch as make_batch
    from repopt.app.bench.workloads import build, train_step

    model, opt = build("repopt", arch, 1000)
    x, y = make_batch(batch, 224, 1000)
    walls, cpus = [], []
    for i in range(repeats + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        train_step(model, opt, x, y)
        if i:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"wall": batch / median(walls), "cpu": batch / median(cpus), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--files", type=int, default=120, help="files timed per worker measurement")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-train-step", action="store_true")
    a = p.parse_args()

    from repopt.data.imagefiles import scan_folder
    from repopt.data.transforms import EvalTransform, TrainTransform

    _, _, train, _, _ = scan_folder(a.folder)
    files = [train.path(i) for i in range(min(a.files, len(train)))]
    sizes = [os.path.getsize(f) for f in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs torch single-threaded
    per_worker(files[:10], None)  # warm the page cache and the decoder
    out = {"cpu": os.cpu_count(), "files": len(files), "mean_file_kib": sum(sizes) / len(sizes) / 1024,
           "load_average_start": os.getloadavg()[0],
           "per_worker_images_per_s": {
               "decode only": per_worker(files, None),
               "decode + RandomResizedCrop(224) + flip": per_worker(files, TrainTransform(224, "rrc-flip", "pillow")),
               "decode + RandomResizedCrop(224) + flip + raug15": per_worker(files, TrainTransform(224, "raug15",
                                                                                                 "pillow")),
               "decode + Resize(224) + CenterCrop(224) (eval)": per_worker(files, EvalTransform(224, None, "pillow")),
           }}
    torch.set_num_threads(threads)
    out["loader_images_per_s"] = {f"{w} workers, raug15, batch 32": loader_rate(a.folder, w) for w in (1, 2)}
    if not a.no_train_step:
        out["train_step_images_per_s"] = {f"{arch} 224x224 batch {b}": train_step_rate(arch, b, steps)
                                          for arch, b, steps in (("repopt_vgg_a0", 16, 3), ("repopt_vgg_b1", 8, 3))}
    raug = out["per_worker_images_per_s"]["decode + RandomResizedCrop(224) + flip + raug15"]["cpu"]
    out["workers_per_gpu_for_445_images_per_s"] = PAPER_B1_IMAGES_PER_S / raug
    out["load_average_end"] = os.getloadavg()[0]
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['files']} JPEGs of {out['mean_file_kib']:.0f} KiB on average; {out['cpu']} CPUs; load average "
          f"{out['load_average_start']:.2f} at start, {out['load_average_end']:.2f} at end")
    print(f"{'one worker (single process, torch 1 thread)':<58} images/s  per CPU-s")
    for k, v in out["per_worker_images_per_s"].items():
        print(f"  {k:<56} {v['wall']:8.1f}  {v['cpu']:8.1f}")
    print("DataLoader, end to end (normalized batches in the trainer)")
    for k, v in out["loader_images_per_s"].items():
        print(f"  {k:<56} {v:8.1f}")
    for k, v in out.get("train_step_images_per_s", {}).items():
        print(f"  training step {k} ({v['threads']} threads){'':<{max(0, 28 - len(k))}} {v['wall']:8.1f}  "
              f"{v['cpu']:8.1f}")
    print(f"workers per GPU for the paper's 445 images/s (B1, raug15), from the per-CPU-second rate: "
          f"{out['workers_per_gpu_for_445_images_per_s']:.1f}")


if __name__ == "__main__":
    main()
