"""Peak memory of one streamed epoch: run `python bench/loader_memory.py FOLDER [--workers N]` in a fresh process;
prints JSON with the peak RSS (MiB) of the training process and of its loader workers.

Used by tests/test_stream_scale.py and docs/benchmarks.md: the same epoch over a folder 10x larger must not need
more memory (the loader keeps the file list, a byte buffer, and the batches in flight, nothing per image).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--augment", default="raug15")
    a = p.parse_args()

    from repopt.data import load_dataset

    ds = load_dataset("folder", a.folder, a.image_size, loader="stream", augment=a.augment, workers=a.workers)
    start, seen = time.perf_counter(), 0
    for x, _ in ds.train_batches(a.batch_size, epoch=0):
        seen += x.shape[0]
    for x, _ in ds.test_batches(a.batch_size):
        seen += x.shape[0]
    seconds = time.perf_counter() - start
    ds.close()
    del ds
    gc.collect()
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps({"images": seen, "seconds": round(seconds, 3),
                      "main_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                      "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib}))


if __name__ == "__main__":
    main()
