"""RepOptSGD: torch SGD with the raw gradient of each target conv replaced by M * G (MATH (3)).

Weight decay, momentum, dampening, nesterov and maximize then act exactly as in torch.optim.SGD, in torch's order.
`p.grad` is never modified. Parameters without a multiplier go through torch's functional `sgd` (torch's
single-tensor, foreach and fused paths and the fused AMP path). Target weights take the first path that applies
(the PATHS table at the end of the class; base.py's router picks every weight's path before anything changes):

1. `compiled=True` (opt-in, deprecated: slower than path 3 on CPU, docs/benchmarks.md): one torch.compile'd kernel
   per weight (compiled.py).
2. Triton (the default for CUDA weights where triton imports, triton_kernels.py): one multi-tensor launch per step
   over every target weight, M from the per-channel tables, GradScaler's scale and inf flag applied in the kernel.
3. The native CPU kernel (the default for float32/float64 CPU weights where a C compiler exists, native.py): the
   multiply inside the update, one pass over p, G and the buffer, like torch's fused SGD; all weights in one call.
4. Eager blocks: a target weight is cut into blocks of output channels; M * G of a block is written into a scratch
   buffer of `scratch_bytes` (allocated per step), and once the scratch is full, torch's `sgd` updates the matching
   blocks of the parameters and momentum buffers (views) while the multiplied gradient is still in cache. Nothing
   full-size is written; on a weight's first step torch creates the momentum buffers of the blocks, and they are
   copied into one full-size buffer.
5. Whole tensors (M * G as a temporary), for layouts that cannot be cut in row blocks, and for `differentiable=True`
   (then in ops autograd follows, with grad enabled during the step as in torch.optim.SGD).
Every path is proven against the explicit multi-branch block (repopt/proofs.py).
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.optim.sgd import sgd

from ..branches import BranchSet
from . import native as native_kernel
from . import triton_kernels
from .base import Path, RepOptMixin, always
from .compiled import step_compiled

DEFAULT_SCRATCH_BYTES = 4 << 20  # fastest of 0.25-16 MiB on the benchmark CPU (docs/benchmarks.md)


def _cuttable(p: Tensor, grad: Tensor, buf: Tensor | None) -> bool:
    """Can p, its grad and its buffer be cut into row blocks that share one dense, non-overlapping layout? (Blocks
    update p before later rows of G are read, so G must not share p's memory.)"""
    if p.ndim < 2 or grad.stride() != p.stride() or (buf is not None and buf.stride() != p.stride()):
        return False
    dense = p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return dense and p.stride(0) == p[0].numel() and native_kernel.disjoint([p, grad, *([buf] if buf is not None
                                                                                         else [])])


class RepOptSGD(RepOptMixin, torch.optim.SGD):
    _default_weight_decay = 0.0
    _kind, _sparse_plain = "sgd", True

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 grad_mults: Mapping[Tensor, Any] | None = None, scratch_bytes: int = DEFAULT_SCRATCH_BYTES,
                 compiled: bool = False, native: bool | None = None, triton: bool | None = None):
        """native: update float32/float64 CPU target weights with the C kernel (multiply and SGD in one pass; see
            repopt/optim/native.py). None (default): when it builds on this machine; True: refuse to run without it;
            False: never.
        scratch_bytes: size of the per-step buffer that receives M * G block by block on the eager path (0: whole
            tensors).
        compiled: deprecated, to be removed: update each target weight with one torch.compile'd kernel instead
            (multiply and SGD in one pass; repopt/optim/compiled.py). The native kernel (CPU) and the Triton kernels
            (CUDA) take the same weights, and on CPU it measured slower than the native kernel (docs/benchmarks.md).
        triton: update CUDA target weights with one multi-tensor Triton launch per step (triton_kernels.py; also
            under GradScaler). None (default): where triton imports; True: require it; False: never.
        """
        if scratch_bytes < 0:
            raise ValueError(f"scratch_bytes must be >= 0, got {scratch_bytes}")
        if compiled:
            warnings.warn("RepOptSGD(compiled=True) is deprecated and will be removed: the native kernel (CPU) and the "
                          "Triton kernels (CUDA) update the same weights, faster on CPU (docs/benchmarks.md)",
                          FutureWarning, stacklevel=2)
        self.scratch_bytes, self.compiled = int(scratch_bytes), bool(compiled)
        self._init_native(native)
        self._init_triton(triton)
        self._init_multipliers(grad_mults)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._check_all_bound()

    def _sgd(self, group, params, grads, buffers, has_sparse: bool = False) -> None:
        """torch's functional sgd. Its fused path takes a call as a first step only when no buffer exists yet and fails
        on a mix of new and existing buffers, so a mix is split into two calls."""
        # `is None`, not `None in buffers`: that compares tensors with None, a raised and caught TypeError each (~20 us)
        if group["fused"] and any(b is None for b in buffers) and any(b is not None for b in buffers):
            for new in (False, True):
                picked = [i for i, b in enumerate(buffers) if (b is None) == new]
                sub = [buffers[i] for i in picked]
                self._sgd(group, [params[i] for i in picked], [grads[i] for i in picked], sub, has_sparse)
                for i, b in zip(picked, sub):
                    buffers[i] = b
            return
        sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"], has_sparse_grad=has_sparse,
            foreach=False if group["differentiable"] else group["foreach"], fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))

    def _skips_a_first_step(self) -> bool:
        """Does GradScaler skip (inf/nan found) a step that would create momentum buffers? Then the whole step is left
        out here: torch's fused kernel (2.13) creates them with empty_like and returns without writing them, so the
        next real step would read uninitialised memory. Existing buffers need no check: the kernels skip them
        themselves, so found_inf is read (a host sync on a GPU) only on steps that would create state."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return False
        creates = any(group["momentum"] != 0 and p.grad is not None and "momentum_buffer" not in self.state.get(p, {})
                      for group in self.param_groups for p in group["params"])
        return creates and bool(found_inf.item())

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Gather, route (every target weight's path is decided before anything changes), dispatch."""
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        if self._skips_a_first_step():
            return loss
        self._dispatch(self._route())
        return loss

    # ---- the paths: PATHS (end of the class) is the table the router tries in order --------------------------------
    def _step_plain(self, group, params: list) -> None:
        """Parameters without a multiplier: torch's functional sgd, as torch.optim.SGD steps them."""
        self._step_torch(group, params, [p.grad for p in params])

    def _step_torch(self, group, params: list, grads: list) -> None:
        momentum = group["momentum"] != 0
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum else []
        self._sgd(group, params, grads, buffers, any(g.is_sparse for g in grads))
        for p, buf in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buf

    def _step_whole(self, group, items: list) -> None:
        """M * G as a full-size temporary, then torch's sgd (with differentiable=True in ops autograd follows)."""
        grads = [mult.multiply(grad) if group["differentiable"] else mult.apply_sgd(grad)
                 for _, grad, mult, *_ in items]
        self._step_torch(group, [item[0] for item in items], grads)
        self._took("whole", len(items))

    def _new_buffer(self, p: Tensor) -> Tensor:
        """p's momentum buffer, created for a first step (zeros: never uninitialised, even if that step fails)."""
        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return buf

    def _buffer(self, group, p: Tensor, state: list) -> tuple[Tensor | None, bool]:
        """(p's momentum buffer or None without momentum, is it new): a new one is created now (zeros)."""
        if group["momentum"] == 0:
            return None, False
        return (self._new_buffer(p), True) if state[0] is None else (state[0], False)

    @staticmethod
    def _native_prepare(p: Tensor, mult):
        return native_kernel.prepare(p, mult)

    def _step_native(self, group, items: list) -> None:
        """The default path on CPU: one native call updates the float32 or float64 target weights of a group."""
        jobs, tensors = [], []
        for p, grad, mult, *state in items:
            buf, first = self._buffer(group, p, state)
            job, table = self._native_job(p, mult, self._native_prepare)
            jobs.append(native_kernel.bind(job, p, grad, buf, first))
            tensors += [p, grad, buf, table]
        native_kernel.sgd_step(jobs, group, items[0][0].dtype, tensors)
        self._took("native", len(items))

    def _step_triton(self, group, items: list) -> None:
        """The default path on CUDA: one multi-tensor Triton launch (GradScaler's scale and inf flag in the kernel)."""
        batch = [(p, mult, grad, *self._buffer(group, p, state)) for p, grad, mult, *state in items]
        triton_kernels.sgd_step(batch, group, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        self._took("triton", len(items))

    def _opens_compiled(self, group, device: torch.device) -> bool:
        return self.compiled and not group["differentiable"] and not self._unscale_pending()

    def _takes_compiled(self, group, p: Tensor, grad: Tensor, mult, buf: Tensor | None = None) -> bool:
        """The compiled path takes contiguous weights with branch scales (first steps included)."""
        return (isinstance(mult, BranchSet) and p.is_contiguous() and grad.is_contiguous()
                and (buf is None or buf.is_contiguous())
                and native_kernel.disjoint([p, grad, *([buf] if buf is not None else [])]))

    def _step_compiled(self, group, items: list) -> None:
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            lr = torch.tensor(lr, dtype=items[0][0].dtype, device=items[0][0].device)
        for i, (p, _, mult, *state) in enumerate(items):
            buf, first = self._buffer(group, p, state)
            try:
                step_compiled(group, p, mult, buf, lr, first)
            except Exception as e:  # no C++ compiler, an unsupported backend...: the eager path is exact too
                if i:  # a failure after a success is a bug, not a missing toolchain
                    raise
                warnings.warn(f"RepOptSGD(compiled=True) could not compile its update ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); using its other paths", stacklevel=2)
                self.compiled = False
                self._step_blocks(group, items)
                return
            self._took("compiled")

    def _opens_blocks(self, group, device: torch.device) -> bool:
        return bool(self.scratch_bytes) and not group["differentiable"]

    def _takes_blocks(self, group, p: Tensor, grad: Tensor, mult, buf: Tensor | None = None) -> bool:
        return _cuttable(p, grad, buf)

    def _step_blocks(self, group, items: list) -> None:
        # torch's fused SGD treats a call as a first step only when no buffer at all exists yet
        momentum = group["momentum"] != 0
        first = [(p, mult, None) for p, _, mult, *state in items if momentum and state[0] is None]
        self._step_in_blocks(group, [(p, mult, state[0] if state else None) for p, _, mult, *state in items
                                     if not (momentum and state[0] is None)])
        for p, _, _ in first:  # filled block by block below
            self._new_buffer(p)
        self._step_in_blocks(group, first, first_step=True)
        self._took("blocks", len(items))

    def _step_in_blocks(self, group, blocked: list, first_step: bool = False) -> None:
        """The default path: M * G block by block into a small scratch, each full scratch one `sgd` call.

        first_step: no momentum buffers exist yet; torch creates one per block and they are copied into the full-size
        buffers already in self.state.
        """
        if not blocked:
            return
        device, dtype = blocked[0][0].device, blocked[0][0].dtype  # one of each: the router's batch
        smallest = max(p[0].numel() * mult.row_alignment for p, mult, _ in blocked)
        total = sum(p.numel() for p, _, _ in blocked)
        capacity = max(min(self.scratch_bytes // dtype.itemsize, total), smallest)
        scratch = torch.empty(capacity, dtype=dtype, device=device)
        used, batch, targets = 0, ([], [], []), []
        for p, mult, buf in blocked:
            grad, row, align = p.grad, p[0].numel(), mult.row_alignment
            pattern = mult.tap_pattern(2, device, dtype) if p.is_contiguous() else None
            start = 0
            while start < p.shape[0]:
                rows = (capacity - used) // row // align * align
                if rows == 0:  # scratch full: update what it holds, then reuse it
                    self._flush(group, batch, targets)
                    used, batch, targets = 0, ([], [], []), []
                    continue
                end = min(p.shape[0], start + rows)
                out = scratch.as_strided((end - start, *p.shape[1:]), p.stride(), used)
                mult.multiply_rows(grad[start:end], start, out, pattern=pattern)
                batch[0].append(p[start:end])
                batch[1].append(out)
                if first_step:
                    batch[2].append(None)
                    targets.append(self.state[p]["momentum_buffer"][start:end])
                elif buf is not None:
                    batch[2].append(buf[start:end])
                used += (end - start) * row
                start = end
        if batch[0]:
            self._flush(group, batch, targets)

    def _flush(self, group, batch, targets) -> None:
        if group["fused"] and not targets and not self._unscale_pending() and not torch.jit.is_scripting():
            # what torch's functional sgd(fused=True) calls for one device and dtype, without its per-call overhead
            # (this runs once per scratch fill); buffers exist here, so this is never a first step
            torch._fused_sgd_(batch[0], batch[1], batch[2], weight_decay=group["weight_decay"],
                              momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                              nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=False)
        else:
            self._sgd(group, *batch)
        for target, created in zip(targets, batch[2]):
            target.copy_(created)

    # the router's table (base.py), in order of preference: compiled (opt-in), Triton (CUDA), native (CPU), blocks,
    # whole tensors (which takes everything)
    PATHS = (Path("compiled", _opens_compiled, _takes_compiled, _step_compiled),
             Path("triton", RepOptMixin._opens_triton, RepOptMixin._takes_triton, _step_triton),
             Path("native", RepOptMixin._opens_native, RepOptMixin._takes_native, _step_native),
             Path("blocks", _opens_blocks, _takes_blocks, _step_blocks),
             Path("whole", always, always, _step_whole))
