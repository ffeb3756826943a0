"""Peak training memory, measured honestly on CPU: each method trains in a fresh Python process, and the figure is
that process's peak resident set during training (Linux VmHWM, reset once the model and optimizer are built) minus
its resident set before the model was built (the runtime is first warmed up on a tiny model, so thread pools and
oneDNN's set-up are not counted, and freed heap is handed back with malloc_trim before each reading). So it counts
weights, gradients, optimizer state, activations and every temporary of the training steps, and nothing of another
method or of the one-time set-up.
torch's CPU allocations are invisible to tracemalloc, hence the process-level measure.

As a second, allocator-independent view, the bytes of activations that autograd saves for the backward pass are
counted with torch.autograd.graph.saved_tensors_hooks (parameters excluded, each storage once).
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so the resident set counts live memory only and
    set-up garbage (RepOpt's float64 re-initialization, model construction) is not billed to training."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_and_peak() -> tuple[int, int, str]:
    rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    if rss is not None and hwm is not None:
        return rss * 1024, hwm * 1024, "VmHWM"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
    return peak, peak, "ru_maxrss"


class SavedActivations:
    """Counts the bytes of the tensors autograd saves for backward while active (parameters excluded, each storage
    once): `with SavedActivations(model) as saved: loss = ...; saved.bytes`."""

    def __init__(self, model):
        import torch

        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def saved_activation_bytes(model, x, y) -> int:
    """Bytes saved for the backward of one training forward of `model` on (x, y) (a forward and backward)."""
    import torch.nn.functional as F

    with SavedActivations(model) as saved:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes


def measure_here(method: str, arch: str, image_size: int, batch_size: int, steps: int = 2, num_classes: int = 1000,
                 threads: int | None = None) -> dict:
    """Run `steps` training steps in this process and return its memory growth (call in a fresh process); the
    first step also counts the activations saved for backward."""
    import torch
    import torch.nn.functional as F

    from .workloads import batch, bench_scales, build, param_bytes, train_step

    if threads:
        torch.set_num_threads(threads)
    # warm up the runtime (thread pools, oneDNN, autograd engine) on a tiny model, so the baseline excludes it
    warm_model, warm_opt = build(method, "repopt_vgg_tiny", 10)
    train_step(warm_model, warm_opt, *batch(2, 16, 10))
    del warm_model, warm_opt
    x, y = batch(batch_size, image_size, num_classes)
    scales = bench_scales(arch, num_classes) if method == "repopt" else None  # built from an HS model: not counted
    _release_free_memory()
    base, _, how = _rss_and_peak()
    model, opt = build(method, arch, num_classes, scales=scales)
    # the peak is taken over training only: set-up transients (RepOpt's re-initialization works in float64) are not
    # training memory, while the weights and everything else built stay counted through `base`
    _release_free_memory()
    reset = _reset_peak()
    opt.zero_grad(set_to_none=True)
    with SavedActivations(model) as saved:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    for _ in range(steps - 1):
        train_step(model, opt, x, y)
    _, peak, how = _rss_and_peak()
    return {"method": method, "arch": arch, "image_size": image_size, "batch_size": batch_size, "steps": steps,
            "peak_bytes": peak - base, "param_bytes": param_bytes(model), "saved_activation_bytes": saved.bytes,
            "how": how + (" reset after set-up" if reset and how == "VmHWM" else " (process peak)")}


def measure_in_subprocess(method: str, arch: str, image_size: int, batch_size: int, steps: int = 2,
                          num_classes: int = 1000, threads: int | None = None, timeout: float = 1800) -> dict:
    spec = dict(method=method, arch=arch, image_size=image_size, batch_size=batch_size, steps=steps,
                num_classes=num_classes, threads=threads)
    env = dict(os.environ, TQDM_DISABLE="1")
    code = "import json, sys; from repopt.app.bench.memory import measure_here; " \
           "print(json.dumps(measure_here(**json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_memory(arch: str, image_size: int, batch_size: int, methods=("repopt", "repvgg"), steps: int = 2,
                num_classes: int = 1000, threads: int | None = None, repeats: int = 3, progress=None) -> dict:
    """Peak training memory of each method: `repeats` fresh processes per method, run alternately, and the median.

    The resident-set peak of one process moves by up to ~15% between identical runs (where freed heap sits when the
    peak is reached), so one process per method is not enough to compare two methods ~10% apart.
    """
    import statistics

    out = {"arch": arch, "image_size": image_size, "batch_size": batch_size, "repeats": repeats}
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(repeats):
        for method in methods:
            runs[method].append(measure_in_subprocess(method, arch, image_size, batch_size, steps, num_classes,
                                                      threads))
            if progress is not None:
                progress()
    for method, results in runs.items():
        peaks = [r["peak_bytes"] for r in results]
        out[method] = {**results[0], "peak_bytes": statistics.median(peaks), "peak_bytes_each": peaks}
    if "repopt" in out and "repvgg" in out:
        out["peak_ratio_repopt_vs_repvgg"] = out["repopt"]["peak_bytes"] / out["repvgg"]["peak_bytes"]
        out["saved_activation_ratio_repopt_vs_repvgg"] = (out["repopt"]["saved_activation_bytes"]
                                                          / out["repvgg"]["saved_activation_bytes"])
    return out
