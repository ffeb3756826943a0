"""The native CPU kernels (kernels/*.c) of RepOptSGD, RepOptAdamW and RepOptLion: build them once per machine, load
them, call them.

Why native: torch's fused CPU SGD reads p, G and the momentum buffer once and writes p and the buffer once. Any eager
way of forming M * G first adds a pass over G and a dozen small ops per weight (~2x a fused step, docs/benchmarks.md).
The C kernel does the multiply inside the update, so a RepOptSGD step costs about what torch's fused SGD step costs.

The kernels are plain C (no torch headers): the machine's C compiler builds them in a few seconds, once, into a cache
directory ($REPOPT_CACHE_DIR, else $XDG_CACHE_HOME/repopt, else ~/.cache/repopt), under a name that hashes the sources,
the compiler command, version and target, and the flags; kernel_cache.py loads a cached file only when it and its
directory are this user's alone, and writes it under a temporary name and renames it, so concurrent processes (DDP
ranks) never load half a file. Without a working compiler `available()` is False and the optimizers keep their eager
paths, which are exact as well. REPOPT_NATIVE=0 turns the kernels off.

The C code takes `restrict` pointers, so a weight whose gradient or state overlaps it in memory is left to the eager
path (`takes`), and every tensor a call reads is referenced until the call returns (ctypes releases the GIL, so
another thread could otherwise drop the last reference, e.g. by setting p.grad to None).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from torch import Tensor

from ..branches import BranchSet
from . import kernel_cache

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / "repopt_sgd.c", KERNELS / "repopt_adaptive.c"]
HEADERS = [KERNELS / "common.h"]
# -ffp-contract=off: the compiler fuses no multiply-add by itself (the AVX2 clone would, and results would then
# depend on the CPU); the kernels call fma() exactly where torch's eager kernels round once (-lm: fma where the CPU
# has no FMA instruction)
FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-fno-fast-math", "-fno-math-errno", "-fno-trapping-math",
         "-ffp-contract=off", "-lm"]
# tried first: with OpenMP the kernel runs on the libgomp torch has already loaded (one thread pool, not two)
OPENMP_FLAGS = ["-fopenmp"]
# Work per thread below which a step runs on fewer threads (torch's own grain size for parallel loops)
ELEMENTS_PER_THREAD = 1 << 15


class Job(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("buf", ctypes.c_void_p),
                ("table", ctypes.c_void_p), ("rows", ctypes.c_int64), ("row_len", ctypes.c_int64),
                ("taps", ctypes.c_int64), ("diag_group", ctypes.c_int64), ("diag_centre", ctypes.c_int64),
                ("identity", ctypes.c_double), ("first", ctypes.c_int64), ("channels_last", ctypes.c_int64)]


class Hyper(ctypes.Structure):
    _fields_ = [("lr", ctypes.c_double), ("weight_decay", ctypes.c_double), ("momentum", ctypes.c_double),
                ("dampening", ctypes.c_double), ("nesterov", ctypes.c_int64), ("maximize", ctypes.c_int64)]


class AdaptiveJob(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("g", ctypes.c_void_p), ("m", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("vmax", ctypes.c_void_p), ("coef", ctypes.c_void_p), ("nb", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("row_len", ctypes.c_int64), ("taps", ctypes.c_int64), ("diag_group", ctypes.c_int64),
                ("diag_centre", ctypes.c_int64), ("channels_last", ctypes.c_int64)]


class AdaptiveHyper(ctypes.Structure):
    _fields_ = [("lr", ctypes.c_double), ("weight_decay", ctypes.c_double), ("beta1", ctypes.c_double),
                ("beta2", ctypes.c_double), ("eps", ctypes.c_double), ("bias_correction1", ctypes.c_double),
                ("bias_correction2_sqrt", ctypes.c_double), ("maximize", ctypes.c_int64),
                ("amsgrad", ctypes.c_int64), ("kind", ctypes.c_int64)]


ADAMW, LION = 0, 1  # kinds of repopt_adaptive_step
MAX_BRANCHES = 8  # conv branches per target conv in repopt_adaptive.c

_library = None      # the loaded kernel, once built
_build_error = None  # why it could not be built (a sentence), once tried


def _compiler() -> list[str] | None:
    return kernel_cache.compiler()


def _build() -> Path:
    """The cached library, compiled first if needed: with OpenMP where the compiler has it, else with POSIX threads."""
    if _compiler() is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    return kernel_cache.build("repopt_kernels", SOURCES, HEADERS, [FLAGS + OPENMP_FLAGS, FLAGS])


def load():
    """The loaded kernel, building it on first use; None (and `build_error()` says why) when that is impossible."""
    global _library, _build_error
    if _library is None and _build_error is None:
        try:
            lib = ctypes.CDLL(str(_build()))
            lib.repopt_sgd_step.argtypes = [ctypes.POINTER(Job), ctypes.c_int64, ctypes.POINTER(Hyper),
                                            ctypes.c_int, ctypes.c_int]
            lib.repopt_sgd_step.restype = ctypes.c_int
            lib.repopt_adaptive_step.argtypes = [ctypes.POINTER(AdaptiveJob), ctypes.c_int64,
                                                 ctypes.POINTER(AdaptiveHyper), ctypes.c_int, ctypes.c_int]
            lib.repopt_adaptive_step.restype = ctypes.c_int
            _library = lib
        except Exception as e:  # no compiler, read-only home, a sandbox without exec...: the eager path is exact too
            _build_error = f"{type(e).__name__}: {e}"
    return _library


def enabled() -> bool:
    """REPOPT_NATIVE is not 0/false/no/off, and the platform is POSIX (the build and the threads assume it)."""
    return os.name == "posix" and os.environ.get("REPOPT_NATIVE", "1").strip().lower() not in ("0", "false", "no",
                                                                                               "off")


def available() -> bool:
    """Is the native kernel usable in this process (enabled, and built and loaded)?"""
    return enabled() and load() is not None


def build_error() -> str | None:
    return _build_error


MAX_TAPS = 1024  # MAX_PERIOD in the C source: kernels of up to 1024 taps (32x32)


# tensor subclasses (DTensor, wrappers) may not own the memory their data_ptr() names: only plain tensors go native
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _layout(t: Tensor) -> str | None:
    if t.is_contiguous():
        return "contiguous"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else None


def _geometry_fields(p: Tensor, mult) -> tuple[int, int, int, int, int, int] | None:
    """`layout_fields` of a weight the C kernels take (float32/float64 CPU weights), else None."""
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
        return None
    return layout_fields(p, mult)


def layout_fields(p: Tensor, mult) -> tuple[int, int, int, int, int, int] | None:
    """(rows, row_len, taps, diag_group, diag_centre, channels_last) of a dense 4-d weight with branch scales,
    contiguous or channels_last, of up to MAX_TAPS taps, as the C and Triton kernels see it; else None."""
    if not (isinstance(mult, BranchSet) and type(p) in _PLAIN and p.ndim == 4 and p.shape[2] * p.shape[3] <= MAX_TAPS
            and p.numel() > 0):
        return None
    layout = _layout(p)
    if layout is None:
        return None
    g = mult.geometry
    kh, kw = g.kernel_size
    diag_group = diag_centre = 0
    if mult.has_identity:
        cy, cx = g.centre
        diag_group, diag_centre = g.out_channels // g.groups, cy * kw + cx  # out = in channels per group here
    return p.shape[0], p.numel() // p.shape[0], kh * kw, diag_group, diag_centre, int(layout == "channels_last")


def prepare(p: Tensor, mult) -> tuple[Job, Tensor] | None:
    """The parts of p's SGD job that stay the same from step to step, and the tap table it points to (kept alive with
    it); None where the kernel cannot take the weight. The gradient and buffer must then have p's dtype and strides
    (`takes`)."""
    fields = _geometry_fields(p, mult)
    if fields is None:
        return None
    rows, row_len, taps, diag_group, diag_centre, channels_last = fields
    table = mult.tap_table(2, p.device, p.dtype)
    job = Job(0, 0, 0, table.data_ptr(), rows, row_len, taps, diag_group, diag_centre, 1.0, 0, channels_last)
    return job, table


def prepare_adaptive(p: Tensor, mult, kind: int) -> tuple[AdaptiveJob, Tensor] | None:
    """As `prepare`, for RepOptAdamW (kind ADAMW: one |alpha_b| table per conv branch) or RepOptLion (kind LION: the
    tap table of power 1)."""
    fields = _geometry_fields(p, mult)
    if fields is None:
        return None
    if kind == ADAMW:
        coef = mult.support_tables(p.device, p.dtype)
    else:
        coef = mult.tap_table(1, p.device, p.dtype)[None]
    if not 1 <= coef.shape[0] <= MAX_BRANCHES:
        return None
    rows, row_len, taps, diag_group, diag_centre, channels_last = fields
    job = AdaptiveJob(0, 0, 0, 0, 0, coef.data_ptr(), coef.shape[0], rows, row_len, taps, diag_group, diag_centre,
                      channels_last)
    return job, coef


def takes(p: Tensor, grad: Tensor, mult, *state: Tensor | None) -> bool:
    """Can a prepared weight's step run natively with this gradient, multiplier and these state tensors (None: absent)?
    The multiplier must be branch scales (`prepare` checked p's layout once); the tensors must share p's dtype and
    strides and not overlap in memory (the kernels take them as `restrict` pointers)."""
    stride = p.stride()
    tensors = [p, grad, *(t for t in state if t is not None)]
    return (isinstance(mult, BranchSet)
            and all(type(t) in _PLAIN and t.dtype == p.dtype and t.stride() == stride for t in tensors[1:])
            and disjoint(tensors))


def disjoint(tensors: list[Tensor]) -> bool:
    """Are the byte ranges these tensors span (first to last element, whatever their strides) pairwise disjoint?

    Called for every target weight on every step, so it does no more than it must: torch has no negative strides
    (data_ptr() is the first element), and a contiguous tensor spans exactly numel() elements."""
    spans = []
    for t in tensors:
        n = t.numel()
        if n:
            extent = n if t.is_contiguous() else 1 + sum((k - 1) * s for k, s in zip(t.shape, t.stride()))
            first = t.data_ptr()
            spans.append((first, first + extent * t.element_size()))
    spans.sort()
    end = 0
    for first, last in spans:
        if first < end:
            return False
        end = last
    return True


def bind(job: Job, p: Tensor, grad: Tensor, buf: Tensor | None, first: bool) -> Job:
    """Point a prepared job at this step's tensors (the gradient may be a new tensor every step)."""
    job.p, job.g, job.buf, job.first = p.data_ptr(), grad.data_ptr(), 0 if buf is None else buf.data_ptr(), first
    return job


def _call(entry, array, njobs: int, hyper, is_double: int, threads: int) -> int:
    return entry(array, njobs, ctypes.byref(hyper), is_double, threads)


def _launch(entry, job_type, jobs: list, hyper, dtype: torch.dtype, prepared_by: str, tensors: list) -> None:
    """Run one kernel entry point over `jobs` (all of `dtype`), on as many of torch's threads as their size is worth.

    tensors: every tensor the jobs point into; referenced here until the call returns.
    """
    numel = sum(j.rows * j.row_len for j in jobs)
    threads = max(1, min(torch.get_num_threads(), numel // ELEMENTS_PER_THREAD))
    array = (job_type * len(jobs))(*jobs)
    status = _call(entry, array, len(jobs), hyper, int(dtype == torch.float64), threads)
    del tensors  # only now may they go
    if status < 0:
        raise RuntimeError(f"the native RepOpt kernel refused a weight that {prepared_by}() accepted (a bug)")


def sgd_step(jobs: list[Job], group: dict, dtype: torch.dtype, tensors: list) -> None:
    """One SGD step of every job (all of `dtype`) with the hyper-parameters of `group`; `tensors`: all they read."""
    lr = group["lr"]
    hyper = Hyper(float(lr.item() if isinstance(lr, Tensor) else lr), float(group["weight_decay"]),
                  float(group["momentum"]), float(group["dampening"]), int(bool(group["nesterov"])),
                  int(bool(group["maximize"])))
    _launch(load().repopt_sgd_step, Job, jobs, hyper, dtype, "prepare", tensors)


def bind_adaptive(job: AdaptiveJob, p: Tensor, grad: Tensor, m: Tensor, v: Tensor | None = None,
                  vmax: Tensor | None = None) -> AdaptiveJob:
    job.p, job.g, job.m = p.data_ptr(), grad.data_ptr(), m.data_ptr()
    job.v, job.vmax = (0 if v is None else v.data_ptr()), (0 if vmax is None else vmax.data_ptr())
    return job


def adaptive_step(jobs: list[AdaptiveJob], kind: int, dtype: torch.dtype, tensors: list, *, lr: float,
                  weight_decay: float, beta1: float, beta2: float, maximize: bool, eps: float = 0.0,
                  bias_correction1: float = 1.0, bias_correction2_sqrt: float = 1.0, amsgrad: bool = False) -> None:
    """One RepOptAdamW or RepOptLion step of every job (all of `dtype`, AdamW: all at the same step count);
    `tensors`: every tensor they read."""
    hyper = AdaptiveHyper(lr, weight_decay, beta1, beta2, eps, bias_correction1, bias_correction2_sqrt,
                          int(maximize), int(amsgrad), kind)
    _launch(load().repopt_adaptive_step, AdaptiveJob, jobs, hyper, dtype, "prepare_adaptive", tensors)
