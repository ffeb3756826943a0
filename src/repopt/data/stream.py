"""Image folders too large for memory, streamed: every epoch decodes the files again in DataLoader worker processes,
with the paper's per-image transforms at the full-resolution source (transforms.py).

Same serving contract as the in-memory Dataset (train_batches / test_batches / calibration_batches /
steps_per_epoch): batches are normalized float tensors on the training device, and a run is deterministic given its
seed. The epoch's permutation is the in-memory loader's (same generator, same draw), a distributed rank takes its
slice of each global batch as there, and each image's augmentation is seeded by (seed, epoch, image index): the
images a rank sees do not depend on the number of workers, and two ranks together see exactly what one process
with their global batch sees. Memory stays flat as the folder grows: the loader holds the file list (a byte buffer)
and the batches in flight, nothing per image.

A file that cannot be decoded stops the run with one sentence naming it; with skip_bad=True it is left out of its
batch and counted in the log instead. A worker process that dies or hangs is reported with the file it was reading.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import re
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from .dataset import Dataset, _epoch_seed, _resolve_device, _shard
from .errors import DataError
from .imagefiles import FileList, fast_jpeg_decoder, open_rgb
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, train_transform

SLOT_BYTES = 1024        # per worker: "pid path" of the file it is decoding
MAX_LISTED = 5           # skipped files named one by one in the log, then counted


class _InFlight:
    """What each worker is decoding right now, in shared memory the parent can read after a worker died or hung."""

    def __init__(self, workers: int):
        self.workers = max(workers, 1)
        self._buf = multiprocessing.get_context().Array(ctypes.c_char, self.workers * SLOT_BYTES, lock=False)

    def _slot(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def mark(self, path: str) -> None:
        raw = f"{os.getpid()} {path}".encode("utf-8", "surrogateescape")[:SLOT_BYTES - 1] + b"\0"
        start = self._slot() * SLOT_BYTES
        self._buf[start:start + len(raw)] = raw

    def clear(self) -> None:
        start = self._slot() * SLOT_BYTES
        self._buf[start:start + 1] = b"\0"

    def files(self, pids: set[int] | None = None) -> list[str]:
        out = []
        for k in range(self.workers):
            raw = bytes(self._buf[k * SLOT_BYTES:(k + 1) * SLOT_BYTES]).split(b"\0", 1)[0]
            if raw:
                pid, _, path = raw.decode("utf-8", "surrogateescape").partition(" ")
                if pids is None or int(pid) in pids:
                    out.append(path)
        return out


class _Bad:
    """A sample that failed: travels through collate to the parent, which names it (or, for a file that could not
    be decoded and skip_bad, counts it). `decode` is False when the file decoded but the transform failed."""

    def __init__(self, path: str, reason: str, decode: bool = True):
        self.path, self.reason, self.decode = path, reason, decode


class _Samples(torch.utils.data.Dataset):
    """What a worker sees: key (image index, augmentation seed) -> (uint8 image, label) or _Bad."""

    def __init__(self, files: FileList, transform, in_flight: _InFlight):
        self.files, self.transform, self.in_flight = files, transform, in_flight

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        index, seed = key
        path = self.files.path(index)
        self.in_flight.mark(path)
        try:
            try:
                img = open_rgb(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure: report the file, never kill the worker
                return _Bad(path, f"{type(e).__name__}: {e}")
            try:
                x = self.transform(img, random.Random(seed))
            except Exception as e:  # noqa: BLE001 - named too, but never skipped: it is not the file's fault
                return _Bad(path, f"{type(e).__name__}: {e}", decode=False)
        finally:
            self.in_flight.clear()
        return x, int(self.files.labels[index])


def _collate(samples):
    good = [s for s in samples if not isinstance(s, _Bad)]
    bad = [s for s in samples if isinstance(s, _Bad)]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


class _Batches(Sampler):
    """Keys of one rank's batches for one pass; `configure` sets the epoch/seed before each pass (set_epoch)."""

    def __init__(self, n: int):
        self.n, self.plan = n, None

    def configure(self, *, order: str, epoch: int, seed: int, global_batch: int, steps: int, rank: int,
                  world_size: int, batch_size: int = 0):
        self.plan = dict(order=order, epoch=epoch, seed=seed, global_batch=global_batch, steps=steps, rank=rank,
                         world_size=world_size, batch_size=batch_size)

    def __len__(self) -> int:
        return self.plan["steps"]

    def __iter__(self):
        p = self.plan
        if p["order"] == "file":  # evaluation: the rank's contiguous shard, in file order
            lo, hi = _shard(0, self.n, p["rank"], p["world_size"])
            for start in range(lo, hi, p["batch_size"]):
                yield [(i, 0) for i in range(start, min(start + p["batch_size"], hi))]
            return
        base = _epoch_seed(p["seed"], p["epoch"])
        g = torch.Generator().manual_seed(base)
        perm = torch.randperm(self.n, generator=g).tolist()  # the in-memory loader's permutation (its first draw)
        gb = p["global_batch"]
        for i in range(p["steps"]):
            lo, hi = _shard(i * gb, min((i + 1) * gb, self.n), p["rank"], p["world_size"])
            yield [(perm[k], (base << 32) | perm[k]) for k in range(lo, hi)]


class StreamedFolder:
    """An image folder served by decoding files per epoch (see the module docstring)."""

    in_channels = 3

    def __init__(self, root, classes, train: FileList, val: FileList, image_size: int, *, policy: str = "rrc-flip",
                 eval_resize: int | None = None, workers: int | None = None, skip_bad: bool = False,
                 timeout: float = 300.0, prefetch: int = 4, backend: str = "auto", log=None):
        self.name, self.source = "folder", str(root)
        self.class_names = tuple(classes)
        self.num_classes = len(self.class_names)
        self.train_files, self.val_files = train, val
        self.image_size, self.policy = int(image_size), policy
        self.eval_resize = int(eval_resize or image_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 0:
            raise DataError(f"the number of loader workers must be >= 0, got {workers}.")
        self.skip_bad, self.timeout, self.prefetch = bool(skip_bad), float(timeout), int(prefetch)
        self.transforms = {"train": train_transform(self.image_size, policy, backend),
                           "eval": EvalTransform(self.image_size, self.eval_resize, backend)}
        fast_jpeg_decoder()  # a bad REPOPT_JPEG_DECODER is refused here, not blamed on a file in a worker
        self.skipped: dict[str, int] = {"train": 0, "val": 0}
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._loaders: dict[tuple, tuple[DataLoader, _Batches, _InFlight]] = {}

    # -- sizes (the in-memory Dataset's rules) ----------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        return len(self.train_files)

    @property
    def num_test(self) -> int:
        return len(self.val_files)

    steps_per_epoch = Dataset.steps_per_epoch  # uses only num_train and name

    # -- loaders --------------------------------------------------------------------------------------------------
    def _loader(self, split: str, transform: str, device: torch.device):
        key = (split, transform, device.type == "cuda")
        if key not in self._loaders:
            files = self.train_files if split == "train" else self.val_files
            in_flight = _InFlight(self.workers)
            batches = _Batches(len(files))
            kw = dict(persistent_workers=split == "train", prefetch_factor=self.prefetch,
                      timeout=self.timeout) if self.workers > 0 else {}
            loader = DataLoader(_Samples(files, self.transforms[transform], in_flight), batch_sampler=batches,
                                num_workers=self.workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                                **kw)
            self._loaders[key] = (loader, batches, in_flight)
        return self._loaders[key]

    def _serve(self, split: str, transform: str, device, **plan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = _resolve_device(device)
        loader, batches, in_flight = self._loader(split, transform, device)
        batches.configure(**plan)
        scale = torch.tensor([1 / (255 * s) for s in self.std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=device).view(1, 3, 1, 1)
        skipped_before = self.skipped[split]
        it = iter(loader)
        while True:
            try:
                x, y, bad = next(it)
            except StopIteration:
                break
            except RuntimeError as e:  # a worker died (signal, out of memory) or timed out
                raise self._worker_error(e, in_flight, split) from None
            for b in bad:
                self._bad(split, b)
            if x is None:
                raise DataError(f"every image of a {split} batch was unreadable (last: {bad[-1].path}); check the "
                                f"folder {self.source}.")
            x = x.to(device, non_blocking=True).float().mul_(scale).add_(shift)
            yield x, y.to(device, non_blocking=True)
        if self.skipped[split] > skipped_before:
            self._log(f"repopt data: skipped {self.skipped[split] - skipped_before} unreadable {split} images in this "
                      f"pass ({self.skipped[split]} in all)")

    def _bad(self, split: str, b: _Bad) -> None:
        if not b.decode:
            raise DataError(f"image {b.path} decoded but its {split} transform failed ({b.reason}).")
        if not self.skip_bad:
            raise DataError(f"image {b.path} could not be read ({b.reason}); fix or remove the file, or pass "
                            f"--skip-bad-images to leave unreadable images out and count them.")
        self.skipped[split] += 1
        if self.skipped[split] <= MAX_LISTED:
            self._log(f"repopt data: skipping unreadable image {b.path} ({b.reason})")

    def _worker_error(self, e: RuntimeError, in_flight: _InFlight, split: str) -> DataError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pids = {int(p) for p in re.findall(r"\d+", msg.split("pid", 1)[1])} if "pid" in msg else None
        files = in_flight.files(pids) or in_flight.files()
        where = (f" while reading {', '.join(files)}" if files else
                 " (no file was being read: the worker failed outside decoding)")
        return DataError(f"a data loader worker failed on the {split} set{where}: {msg}.")

    # -- the serving contract -------------------------------------------------------------------------------------
    def train_batches(self, batch_size: int, epoch: int, seed: int = 0, device="cpu", augment: bool = True,
                      rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if not 0 <= rank < world_size:
            raise DataError(f"rank must lie in [0, world_size={world_size}), got {rank}.")
        steps = self.steps_per_epoch(batch_size, world_size, drop_last)
        return self._serve("train", "train" if augment else "eval", device, order="random", epoch=epoch,
                           seed=seed, global_batch=batch_size * world_size, steps=steps, rank=rank,
                           world_size=world_size)

    def test_batches(self, batch_size: int, device="cpu", rank: int = 0, world_size: int = 1):
        """The rank's contiguous share of the val images in file order (all of them with one rank)."""
        if int(batch_size) < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        lo, hi = _shard(0, self.num_test, rank, world_size)
        steps = -(-(hi - lo) // batch_size)
        return self._serve("val", "eval", device, order="file", epoch=0, seed=0, global_batch=0, steps=steps,
                           rank=rank, world_size=world_size, batch_size=batch_size)

    def calibration_batches(self, n_batches: int, batch_size: int, device="cpu"):
        """A few shuffled train batches, unaugmented (the evaluation transform), fixed seed: for INT8 calibration."""
        import itertools

        batches = self.train_batches(batch_size, epoch=0, seed=0, device=device, augment=False, drop_last=False)
        return list(itertools.islice(batches, max(int(n_batches), 0)))

    def close(self) -> None:
        """Stop the worker processes (they also stop when the object is garbage-collected)."""
        self._loaders.clear()

    def describe(self) -> str:
        return (f"streamed folder {self.source}: {self.num_train} train / {self.num_test} val images, "
                f"{self.num_classes} classes; train {self.transforms['train']!r}; eval {self.transforms['eval']!r}; "
                f"{self.workers} workers")

    def __repr__(self) -> str:
        return (f"StreamedFolder({self.source!r}, classes={self.num_classes}, train={self.num_train}, "
                f"test={self.num_test}, image_size={self.image_size}, policy={self.policy!r}, "
                f"workers={self.workers})")


def default_workers() -> int:
    """Worker processes per rank when not given: the CPUs this process may use, shared by the ranks on the node,
    less one for the training process itself, at most 8 (the reference code's setting)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(1, min(8, cpus // local - 1))
