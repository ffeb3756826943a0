"""The compiled optimizer kernels, built (or loaded from their cache) before a run's clock starts.

On a fresh machine the C kernels of repopt/optim/native.py are compiled on first use: inside RepOpt's first training
step, that was counted in its training time (903 against plain SGD's 1,304 images/s on the same network, the same
step). `train` calls `build_before_clock` after the optimizer exists and before the timed loop, and reports the
one-time cost apart (result.json `kernel_build_seconds`, a line of the pipeline's report).
"""
from __future__ import annotations

import time

from torch.optim import Optimizer


def build_before_clock(optimizer: Optimizer) -> dict:
    """Build or load the native kernels a RepOpt optimizer's steps will use; {} when it uses none (plain SGD, the
    kernels turned off, no CPU weights). Otherwise {"kernel_build_seconds": the time it took, "kernels": "native",
    or why there are none (the steps then take the eager path, which is exact too)}."""
    from ..optim import native
    from ..optim.base import RepOptMixin

    if not isinstance(optimizer, RepOptMixin) or getattr(optimizer, "native", None) is False or not native.enabled():
        return {}
    if not any(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"]):
        return {}  # GPU weights take the Triton kernels, not these
    start = time.perf_counter()
    loaded = native.load() is not None
    return {"kernel_build_seconds": time.perf_counter() - start,
            "kernels": "native" if loaded else f"none ({native.build_error()})"}
