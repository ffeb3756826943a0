"""Multi-tensor Triton kernels of RepOptSGD, RepOptAdamW and RepOptLion for GPU weights: one launch per step (per
device and dtype) updates every target weight of a param group, reading M from the per-channel tap tables as the CPU
kernel does (no full-size mask), with torch's flags (maximize, weight decay, momentum, dampening, nesterov, amsgrad)
and GradScaler's grad_scale / found_inf.

Why Triton and not a torch.compile'd multi-tensor step (reasoned, not measured on a GPU: docs/benchmarks.md). The step
is memory-bound: torch's fused SGD moves 20 bytes per float32 weight, ~0.25 ms for RepOpt-VGG-B1 on an H200, so
launch overhead decides the ratio. A compiled step gives one kernel per weight (B1: 28 target convs, ~10 us of wrapper
each, about the whole step again), recompiles for new shapes and compiles for minutes on the first step of a large
model; one hand-written launch over a table of (tensor, block) pairs costs one launch and a small pointer table per
step, compiles once per variant, and its arithmetic is written out like the C kernel's. It is an optional dependency
(`pip install repopt[triton]`), imported only when a step needs it.

Compiled code: every launch passes enable_fp_fusion=False (Triton's default has changed across versions), so that
the GPU rounds each operation as the C kernels do; `warm_up` compiles and loads a launch's variants before the step
changes anything and raises PathUnavailable naming the cause; each (device, dtype) group launches under
torch.cuda.device(its device), on that device's current stream. bench/triton_compile_check.py compiles every variant
for sm_80 and sm_90 in CI (no GPU needed) and checks the PTX for contractible float operations.

Without a GPU the same kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before triton
is imported): slowly, for tests; the float64 proofs run through it in CI (`RepOpt*(triton=True)` on CPU tensors).

A weight is seen as in the C kernels: C_out rows of row_len = C_in/groups * taps elements, ordered (channel, tap)
when contiguous and (tap, channel) in channels_last; the identity's diagonal element of a row is input channel
row % diag_group at tap diag_centre.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
from torch import Tensor

from . import native
from .paths import PathUnavailable

NMETA = 24  # int64 fields per weight: see _META
_META = ("p", "g", "s1", "s2", "s3", "table", "numel", "row_len", "taps", "diag_cols", "diag_centre",
         "channels_last", "first", "nb", "plane", "inner", "row_len_magic", "row_len_shift", "inner_magic",
         "inner_shift")
# (BLOCK, num_warps) per kernel and weight dtype, chosen from the compiled sm_90 code by the rule of
# bench/triton_compile_check.py --sweep (no spills, >= 16 resident warps per SM, enough bytes in flight, then the
# fewest instructions per element): the table is in docs/benchmarks.md, "Triton kernels: compiled resource use"
_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
CONFIG = {("sgd", _F32): (1024, 4), ("sgd", _F64): (2048, 8), ("sgd", _F16): (2048, 4), ("sgd", _BF16): (2048, 4),
          ("adamw", _F32): (1024, 4), ("adamw", _F64): (512, 4), ("adamw", _F16): (1024, 4),
          ("adamw", _BF16): (1024, 4),
          ("lion", _F32): (2048, 4), ("lion", _F64): (1024, 4), ("lion", _F16): (1024, 4), ("lion", _BF16): (2048, 4)}
INT32_LIMIT = 2 ** 31  # a launch with a tensor of this many elements or more takes the INDEX64 variant
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_state = {"kernels": None, "error": None}
_block_tables: dict[tuple, Tensor] = {}
_diag_tables: dict[tuple, Tensor] = {}
_ready: set[tuple] = set()  # variants compiled and loaded on a device (warm_up)


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


# ---- index arithmetic: what the host computes so that the kernels divide by nothing per element -------------------
def magic(d: int) -> tuple[int, int]:
    """(magic, shift) with floor(n / d) == (umulhi(n, magic) + n) >> shift for every 0 <= n < 2^31 and d >= 1
    (Granlund and Montgomery's division by an invariant integer, the 33-bit multiplier's top bit added as `+ n`)."""
    shift = (d - 1).bit_length()  # ceil(log2 d)
    return -(-(1 << (32 + shift)) // d) - (1 << 32), shift


def index64(numels) -> bool:
    """Does a launch over tensors of these sizes need the INDEX64 variant (int64 block table and per-program offsets)?
    Lane arithmetic is 32-bit in both: it is relative to the block's first row (`takes` bounds a row's length)."""
    return max(numels, default=0) >= INT32_LIMIT


def block_fields(row_len: int, starts: Tensor) -> Tensor:
    """(len(starts), 3) int64: each block's first element, its row and its column in the row: the per-program values
    the kernels' index arithmetic starts from."""
    starts = starts.to(torch.int64)
    row = torch.div(starts, row_len, rounding_mode="floor")
    return torch.stack([starts, row, starts - row * row_len], 1)


def _block_table(geoms: tuple, block: int, wide: bool, device: torch.device) -> Tensor:
    """(blocks, 4) of the launch's programs: weight, then block_fields (cached per geometry: it does not change)."""
    key = (geoms, block, wide, device)
    table = _block_tables.get(key)
    if table is None:
        parts = [torch.cat([torch.full((math.ceil(n / block), 1), i, dtype=torch.int64),
                            block_fields(row_len, torch.arange(0, n, block))], 1)
                 for i, (n, row_len) in enumerate(geoms)]
        table = torch.cat(parts).to(torch.int64 if wide else torch.int32)
        table = _block_tables[key] = table.to(device)
    return table


def diag_columns(fields: tuple, device: torch.device) -> Tensor:
    """int32 per row: the column of the identity's diagonal element in the row (-1: no identity branch), so that the
    kernels find it with one load per element rather than a modulo (cached per geometry)."""
    key = (fields, device)
    table = _diag_tables.get(key)
    if table is None:
        table = _diag_tables[key] = diag_columns_of(fields, torch.arange(fields[0])).to(device)
    return table


def diag_columns_of(fields: tuple, rows: Tensor) -> Tensor:
    """diag_columns for these rows (int32)."""
    _, row_len, taps, diag_group, diag_centre, channels_last = fields
    if not diag_group:
        return torch.full(rows.shape, -1, dtype=torch.int32)
    channel = rows.to(torch.int64) % diag_group
    return (diag_centre * (row_len // taps) + channel if channels_last else channel * taps + diag_centre).int()


def _meta_row(p: Tensor, mult, grad: Tensor, s1=None, s2=None, s3=None, table=None, first=False, nb=1) -> list:
    fields = native.layout_fields(p, mult)
    rows, row_len, taps, diag_group, diag_centre, channels_last = fields
    inner = row_len // taps if channels_last else taps
    ptr = (lambda t: 0 if t is None else t.data_ptr())
    row = [p.data_ptr(), grad.data_ptr(), ptr(s1), ptr(s2), ptr(s3), ptr(table), p.numel(), row_len, taps,
           diag_columns(fields, p.device).data_ptr(), diag_centre, channels_last, int(first), nb, rows * taps, inner,
           *magic(row_len), *magic(inner)]
    return row + [0] * (NMETA - len(row))


# ---- which tensors the kernels take ------------------------------------------------------------------------------
def takes(p: Tensor, grad: Tensor, mult, *state: Tensor | None) -> bool:
    """Can the kernels update weight p (dense, contiguous or channels_last, float) with this gradient, multiplier and
    state (None: absent)? Every tensor must share p's dtype, strides and device and not overlap another. The
    signature is native.takes's: the router (optim/base.py) asks every backend the same way."""
    fields = native.layout_fields(p, mult)
    if fields is None or p.dtype not in _DTYPES or type(p) not in native._PLAIN:
        return False
    if fields[1] + 2 * max(b for b, _ in CONFIG.values()) >= INT32_LIMIT:  # a row's lanes must fit 32 bits
        return False
    tensors = [p, grad, *(t for t in state if t is not None)]
    if p.numel() % vector_width(p.dtype, [p.numel()]) == 0 and any(t.data_ptr() % 16 for t in tensors):
        return False  # a launch may take 16-byte vectors of this weight's tensors (vector_width)
    return (all(type(t) in native._PLAIN and t.dtype == p.dtype and t.stride() == p.stride()
                and t.device == p.device for t in tensors[1:]) and native.disjoint(tensors))


# ---- launching ---------------------------------------------------------------------------------------------------
def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype == torch.float64 else torch.float32  # fp16/bf16 weights: float32 arithmetic, as torch's


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16}[dtype]


def vector_width(dtype: torch.dtype, numels) -> int:
    """Elements per vectorised access (16 bytes) where every weight of the launch has a multiple of that many
    elements, else 1: the kernels' masks are then constant over that many lanes (`takes` checks the alignment)."""
    vec = 16 // dtype.itemsize
    return vec if all(n % vec == 0 for n in numels) else 1


def _variant(kind: str, dtype: torch.dtype, numels: list[int]) -> dict:
    """The constexpr arguments and launch options of `kind`'s kernel for weights of this dtype and these sizes (the
    flags are run-time values: one variant serves them all)."""
    block, warps = CONFIG[(kind, dtype)]
    return dict(NMETA=NMETA, BLOCK=block, INDEX64=index64(numels), VEC=vector_width(dtype, numels),
                DT=_tl_dtype(dtype), CT=_tl_dtype(_table_dtype(dtype)), num_warps=warps, enable_fp_fusion=False)


@contextlib.contextmanager
def _on_device(device: torch.device):
    """Launch on `device` and its current stream, whatever the current device is: Triton launches on torch's current
    device and that device's current stream."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.current_stream(device)):
        yield


def _groups(items: list) -> dict:
    out: dict[tuple, list] = {}
    for item in items:
        out.setdefault((item[0].dtype, item[0].device), []).append(item)
    return out


def _geometry(rows: list[list]) -> tuple:
    return tuple((r[6], r[7]) for r in rows)  # (numel, row_len) per weight


def _launch(kind: str, kernel, rows: list[list], dtype, device, args: tuple) -> None:
    geoms = _geometry(rows)
    variant = _variant(kind, dtype, [g[0] for g in geoms])
    blocks = _block_table(geoms, variant["BLOCK"], variant["INDEX64"], device)
    meta = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    kernel[(blocks.shape[0],)](meta, blocks, *args, **variant)


def _amp_args(grad_scale: Tensor | None, found_inf: Tensor | None, like: Tensor) -> tuple:
    one = torch.ones((), dtype=torch.float32, device=like.device)
    zero = torch.zeros((), dtype=torch.float32, device=like.device)
    return (one if grad_scale is None else grad_scale.to(like.device, torch.float32),
            zero if found_inf is None else found_inf.to(like.device, torch.float32))


def _hyper(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scalars of a launch as a tensor of the compute type: Triton would pass Python floats as float32."""
    hyper = torch.tensor(values, dtype=_table_dtype(dtype))
    return hyper.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hyper


def sgd_step(items: list, group: dict, grad_scale=None, found_inf=None) -> None:
    """items: (p, mult, grad, buf, first) per target weight; buf None when momentum is 0 (first: buf is new)."""
    kernel = _load()[0]
    for (dtype, device), batch in _groups(items).items():
        with _on_device(device):
            rows, keep = [], []
            for p, mult, grad, buf, first in batch:
                table = mult.tap_table(2, device, _table_dtype(dtype))
                rows.append(_meta_row(p, mult, grad, s1=buf, table=table, first=first))
                keep += [p, grad, buf, table]
            scale, inf = _amp_args(grad_scale, found_inf, batch[0][0])
            hyper = _hyper([float(group["lr"]), float(group["weight_decay"]), float(group["momentum"]),
                            1.0 - float(group["dampening"]), bool(group["nesterov"]), bool(group["maximize"])],
                           dtype, device)
            _launch("sgd", kernel, rows, dtype, device, (scale, inf, hyper))
            del keep


def adamw_step(items: list, group: dict, step: float, grad_scale=None) -> None:
    """items: (p, mult, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None), all at step count `step` (after +1)."""
    kernel = _load()[1]
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    for (dtype, device), batch in _groups(items).items():
        with _on_device(device):
            rows, keep = [], []
            for p, mult, grad, m, v, vmax in batch:
                coef = mult.support_tables(device, _table_dtype(dtype))
                rows.append(_meta_row(p, mult, grad, s1=m, s2=v, s3=vmax, table=coef, nb=coef.shape[0]))
                keep += [p, grad, m, v, vmax, coef]
            scale, _ = _amp_args(grad_scale, None, batch[0][0])
            hyper = _hyper([1.0 - lr * wd, 1.0 - beta1, beta2, 1.0 - beta2, float(group["eps"]),
                            math.sqrt(1 - beta2 ** step), -lr / (1 - beta1 ** step), bool(group["amsgrad"]),
                            bool(group["maximize"])], dtype, device)
            _launch("adamw", kernel, rows, dtype, device, (scale, hyper))
            del keep


def lion_step(items: list, group: dict) -> None:
    """items: (p, mult, grad, exp_avg) per target weight."""
    kernel = _load()[2]
    beta1, beta2 = group["betas"]
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    for (dtype, device), batch in _groups(items).items():
        with _on_device(device):
            rows, keep = [], []
            for p, mult, grad, m in batch:
                table = mult.tap_table(1, device, _table_dtype(dtype))
                rows.append(_meta_row(p, mult, grad, s1=m, table=table))
                keep += [p, grad, m, table]
            hyper = _hyper([1.0 - lr * wd, -lr, beta1, 1.0 - beta1, beta2, 1.0 - beta2, wd != 0,
                            bool(group["maximize"])], dtype, device)
            _launch("lion", kernel, rows, dtype, device, (hyper,))
            del keep


# ---- readying the code before a step changes anything ------------------------------------------------------------
_KINDS = ("sgd", "adamw", "lion")
# the pointer arguments after (meta, blocks), as dtypes ("compute": the compute type): what Triton specialises on
_POINTERS = {"sgd": (torch.float32, torch.float32, "compute"), "adamw": (torch.float32, "compute"),
             "lion": ("compute",)}


def _cause(e: BaseException) -> str:
    """What a failure to compile or load a kernel means for the user, from triton's exception."""
    first = str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else ""
    text = f"{type(e).__name__}: {first}"  # its first sentence: the error is named in one sentence
    low = text.lower()
    if "c compiler" in low or "gcc" in low or "clang" in low:
        return f"triton found no working host C compiler to build its launcher ({text})"
    if any(w in low for w in ("unsupported toolchain", "unsupported_ptx", "ptx version", "driver", "no kernel image")):
        return f"the CUDA driver is too old for the code triton emits ({text})"
    if type(e).__name__ in ("CompilationError", "PTXASError") or "ptxas" in low or "compil" in low:
        return f"the kernel failed to compile ({text})"
    return f"readying the kernel failed ({text})"


def warm_up(kind: str, group: dict, params: list) -> None:
    """Compile (or fetch from triton's cache) and load every variant of `kind`'s kernel that a step of `group` over
    these target weights will launch, reading no tensor's data; raise PathUnavailable, one sentence naming the
    cause, where that fails. Under the interpreter nothing is compiled."""
    if kind not in _KINDS:
        raise ValueError(f"warm_up: kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    kernels = _load()
    if kernels is None:
        raise PathUnavailable(f"the Triton {kind} kernel cannot run: triton cannot be imported ({error()})")
    kernel = kernels[_KINDS.index(kind)]
    for (dtype, device), batch in _groups([(p,) for p in params]).items():
        if device.type != "cuda":
            continue  # the interpreter (CPU tensors) compiles nothing; usable() refuses CPU tensors otherwise
        variant = _variant(kind, dtype, [p.numel() for (p,) in batch])
        key = (kind, device, tuple(sorted((k, str(v)) for k, v in variant.items())))
        if key in _ready:
            continue
        pointers = [_table_dtype(dtype) if t == "compute" else t for t in _POINTERS[kind]]
        try:
            with _on_device(device):
                compiled = kernel.warmup(torch.int64, torch.int64 if variant["INDEX64"] else torch.int32, *pointers,
                                         grid=(1,), **variant)
                if compiled is not None:  # None: a jit_cache_hook of the user's took over the compile
                    compiled._init_handles()  # load the module: the driver's checks (PTX version, image) run here
        except Exception as e:
            raise PathUnavailable(f"the Triton {kind} kernel cannot run on {device}: {_cause(e)}") from e
        _ready.add(key)
