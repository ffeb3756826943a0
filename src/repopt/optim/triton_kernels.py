"""Multi-tensor Triton kernels of RepOptSGD, RepOptAdamW and RepOptLion for GPU weights: one launch per step (per
dtype) updates every target weight of a param group, reading M from the per-channel tap tables as the CPU kernel does
(no full-size mask), with torch's flags (maximize, weight decay, momentum, dampening, nesterov, amsgrad) and
GradScaler's grad_scale / found_inf.

Why Triton and not a torch.compile'd multi-tensor step (reasoned, not measured: no GPU was available when this was
written; docs/benchmarks.md). The step is memory-bound: torch's fused SGD moves 20 bytes per float32 weight, ~0.25 ms
for RepOpt-VGG-B1 on an H200, so launch overhead decides the ratio. A compiled step gives one kernel per weight (B1:
28 target convs, ~10 us of wrapper each, about the whole step again), recompiles for new shapes and compiles for
minutes on the first step of a large model; one hand-written launch over a table of (tensor, block) pairs costs one
launch and a small pointer table per step, compiles once per dtype, and its arithmetic is written out like the C
kernel's (fma where torch's kernels fuse, correctly rounded sqrt and division). It is an optional dependency
(`pip install repopt[triton]`), imported only when a step needs it.

Without a GPU the same kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported): slowly, for tests; the float64 proofs run through it in CI (`RepOpt*(triton=True)` on CPU tensors).

A weight is seen as in the C kernels: C_out rows of row_len = C_in/groups * taps elements, ordered (channel, tap)
when contiguous and (tap, channel) in channels_last; the identity's diagonal element of a row is input channel
row % diag_group at tap diag_centre.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from . import native

BLOCK = 1024
NMETA = 16  # int64 fields per tensor: see _META
_META = ("p", "g", "s1", "s2", "s3", "table", "numel", "row_len", "taps", "diag_group", "diag_centre",
         "channels_last", "first", "nb", "rows")
_state = {"kernels": None, "error": None}
_block_tables: dict[tuple, tuple[Tensor, Tensor]] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load():
    """(sgd, adamw, lion) jitted kernels; None (and `error()` says why) where triton cannot be imported."""
    if _state["kernels"] is None and _state["error"] is None:
        try:
            from . import triton_jit
            _state["kernels"] = triton_jit.kernels()
        except Exception as e:  # not installed, or a broken install: the other paths are exact too
            _state["error"] = f"{type(e).__name__}: {e}"
    return _state["kernels"]


def error() -> str | None:
    return _state["error"]


def usable(device: torch.device) -> str | None:
    """Why the Triton path cannot update weights on `device` (None: it can)."""
    if device.type == "cpu" and not interpreting():
        return "on CPU tensors the Triton kernels run only under TRITON_INTERPRET=1 (for tests)"
    if device.type not in ("cpu", "cuda"):
        return f"no Triton kernels for {device.type} tensors"
    if _load() is None:
        return f"triton cannot be imported ({error()}); pip install 'repopt[triton]'"
    return None


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def takes(p: Tensor, mult, grad: Tensor, *state: Tensor | None) -> bool:
    """Can the kernels update weight p (dense, contiguous or channels_last, float) with this gradient and state?"""
    fields = native.layout_fields(p, mult)
    if fields is None or p.dtype not in _DTYPES or type(p) not in native._PLAIN:
        return False
    tensors = [p, grad, *(t for t in state if t is not None)]
    return (all(type(t) in native._PLAIN and t.dtype == p.dtype and t.stride() == p.stride()
                and t.device == p.device for t in tensors[1:]) and native.disjoint(tensors))


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype == torch.float64 else torch.float32  # fp16/bf16 weights: float32 arithmetic, as torch's


def _meta_row(p: Tensor, mult, grad: Tensor, s1=None, s2=None, s3=None, table=None, first=False, nb=1) -> list:
    rows, row_len, taps, diag_group, diag_centre, channels_last = native.layout_fields(p, mult)
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    return [p.data_ptr(), grad.data_ptr(), ptr(s1), ptr(s2), ptr(s3), ptr(table), p.numel(), row_len, taps,
            diag_group, diag_centre, channels_last, int(first), nb, rows, 0]


def _launch_tables(rows: list[list], device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """The per-tensor metadata (new every step: gradients move) and the (tensor, first element) of every block
    (cached per list of sizes)."""
    sizes = tuple(r[6] for r in rows)
    cached = _block_tables.get((sizes, device))
    if cached is None:
        which = torch.cat([torch.full((math.ceil(n / BLOCK),), i, dtype=torch.int64) for i, n in enumerate(sizes)])
        start = torch.cat([torch.arange(0, n, BLOCK, dtype=torch.int64) for n in sizes])
        cached = _block_tables[(sizes, device)] = (which.to(device), start.to(device))
    meta = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    return meta, cached[0], cached[1], cached[0].numel()


def _amp_args(grad_scale: Tensor | None, found_inf: Tensor | None, like: Tensor) -> tuple:
    one = torch.ones((), dtype=torch.float32, device=like.device)
    zero = torch.zeros((), dtype=torch.float32, device=like.device)
    return (one if grad_scale is None else grad_scale.to(like.device, torch.float32),
            zero if found_inf is None else found_inf.to(like.device, torch.float32))


def _groups(items: list) -> dict:
    out: dict[tuple, list] = {}
    for item in items:
        out.setdefault((item[0].dtype, item[0].device), []).append(item)
    return out


def sgd_step(items: list, group: dict, grad_scale=None, found_inf=None) -> None:
    """items: (p, mult, grad, buf, first) per target weight; buf None when momentum is 0 (first: buf is new)."""
    sgd_kernel = _load()[0]
    lr = float(group["lr"])
    momentum = float(group["momentum"])
    for (dtype, device), batch in _groups(items).items():
        rows, keep = [], []
        for p, mult, grad, buf, first in batch:
            table = mult.tap_table(2, device, _table_dtype(dtype))
            rows.append(_meta_row(p, mult, grad, s1=buf, table=table, first=first))
            keep += [p, grad, buf, table]
        meta, which, start, blocks = _launch_tables(rows, device)
        scale, inf = _amp_args(grad_scale, found_inf, batch[0][0])
        hyper = _hyper([lr, float(group["weight_decay"]), momentum, 1.0 - float(group["dampening"])], dtype, device)
        sgd_kernel[(blocks,)](meta, which, start, scale, inf, hyper, NMETA=NMETA, BLOCK=BLOCK,
                              HAS_WD=float(group["weight_decay"]) != 0, HAS_MOMENTUM=momentum != 0,
                              NESTEROV=bool(group["nesterov"]), MAXIMIZE=bool(group["maximize"]),
                              HAS_SCALE=grad_scale is not None, DT=_tl_dtype(dtype),
                              CT=_tl_dtype(_table_dtype(dtype)))
        del keep


def adamw_step(items: list, group: dict, step: float, grad_scale=None) -> None:
    """items: (p, mult, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None), all at step count `step` (after +1)."""
    adamw_kernel = _load()[1]
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    for (dtype, device), batch in _groups(items).items():
        rows, keep = [], []
        for p, mult, grad, m, v, vmax in batch:
            coef = mult.support_tables(device, _table_dtype(dtype))
            rows.append(_meta_row(p, mult, grad, s1=m, s2=v, s3=vmax, table=coef, nb=coef.shape[0]))
            keep += [p, grad, m, v, vmax, coef]
        meta, which, start, blocks = _launch_tables(rows, device)
        scale, _ = _amp_args(grad_scale, None, batch[0][0])
        hyper = _hyper([1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, float(group["eps"]),
                        math.sqrt(1 - beta2 ** step), -lr / (1 - beta1 ** step)], dtype, device)
        adamw_kernel[(blocks,)](meta, which, start, scale, hyper, NMETA=NMETA, BLOCK=BLOCK,
                                AMSGRAD=bool(group["amsgrad"]), MAXIMIZE=bool(group["maximize"]),
                                HAS_SCALE=grad_scale is not None, DT=_tl_dtype(dtype),
                                CT=_tl_dtype(_table_dtype(dtype)))
        del keep


def lion_step(items: list, group: dict) -> None:
    """items: (p, mult, grad, exp_avg) per target weight."""
    lion_kernel = _load()[2]
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    for (dtype, device), batch in _groups(items).items():
        rows, keep = [], []
        for p, mult, grad, m in batch:
            table = mult.tap_table(1, device, _table_dtype(dtype))
            rows.append(_meta_row(p, mult, grad, s1=m, table=table))
            keep += [p, grad, m, table]
        meta, which, start, blocks = _launch_tables(rows, device)
        hyper = _hyper([1.0 - lr * wd, -lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2], dtype, device)
        lion_kernel[(blocks,)](meta, which, start, hyper, NMETA=NMETA, BLOCK=BLOCK, HAS_WD=wd != 0,
                               MAXIMIZE=bool(group["maximize"]), DT=_tl_dtype(dtype),
                               CT=_tl_dtype(_table_dtype(dtype)))
        del keep


def _hyper(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scalars of a launch as a tensor of the compute type: Triton would pass Python floats as float32."""
    hyper = torch.tensor(values, dtype=_table_dtype(dtype))
    return hyper.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hyper


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]
