"""Timing that stays fair on a shared, loaded machine: compared variants run interleaved (A B A B ...), so both see
the same load, and each figure is a median over repeats. Also: the description of the machine a run was made on."""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def interleaved(variants: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, progress=None) -> dict[str, list[float]]:
    """Seconds per call of every variant, `repeats` rounds of one call each, in a fixed round-robin order.

    The first `warmup` rounds are run and dropped (allocator, caches, lazily built state such as momentum buffers).
    `sync` (e.g. torch.cuda.synchronize) is called before each clock read so asynchronous devices are timed too.
    """
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress()
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios: each round's two calls ran back to back, so a burst of outside load that hits
    one round cancels out of its ratio."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": median(values), "min_s": float(min(values)), "max_s": float(max(values)),
            "repeats": len(values)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict[str, object]:
    """What a reader needs to judge the numbers: device, torch version, thread count, load at the start."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model()} ({os.cpu_count()} logical CPUs)"
    from ... import __version__

    return {"device": f"{device.type}: {name}", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "repopt": __version__, "load_average_1min": load_average()}
