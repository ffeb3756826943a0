"""RepOptSGD: torch SGD with the raw gradient of each target conv replaced by M * G (MATH (3)).

Weight decay, momentum, dampening, nesterov and maximize then act exactly as in torch.optim.SGD, in torch's order.
`p.grad` is never modified. Parameters without a multiplier go through torch's functional `sgd` (torch's
single-tensor, foreach and fused paths and the fused AMP path). Target weights take the first path that applies:

1. `compiled=True` (opt-in): one torch.compile'd kernel per weight (compiled.py), for devices without paths 2-3.
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
from .base import RepOptMixin
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
        compiled: update each target weight with one torch.compile'd kernel instead (multiply and SGD in one pass;
            see repopt/optim/compiled.py): for devices without the native kernel; the first steps compile.
        triton: update CUDA target weights with one multi-tensor Triton launch per step (triton_kernels.py; also
            under GradScaler). None (default): where triton imports; True: require it; False: never.
        """
        if scratch_bytes < 0:
            raise ValueError(f"scratch_bytes must be >= 0, got {scratch_bytes}")
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
        if group["fused"] and buffers and None in buffers and any(b is not None for b in buffers):
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
        creates = any(group["momentum"] != 0 and p.grad is not None and "momentum_buffer" not in self.state[p]
                      for group in self.param_groups for p in group["params"])
        return creates and bool(found_inf.item())

    @_use_grad_for_differentiable
    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        if self._skips_a_first_step():
            return loss
        for gi, group in enumerate(self.param_groups):
            momentum = group["momentum"] != 0
            params, grads, buffers, blocked, compiled, native, tri = [], [], [], [], [], [], []
            whole = 0
            has_sparse = False
            use_native = self._native_allowed(group)
            use_triton: dict[torch.device, bool] = {}
            for p, mult in zip(group["params"], self._multipliers[gi]):
                if p.grad is None:
                    continue
                grad = p.grad
                buf = self.state[p].get("momentum_buffer") if momentum else None
                if mult is not None:
                    if grad.is_sparse:
                        raise RuntimeError(f"{mult.name}: RepOptSGD does not support sparse gradients on a "
                                           f"parameter with a multiplier")
                    # the one place that picks a target weight's path: compiled (opt-in), Triton (GPU), native (CPU),
                    # blocks, whole tensors
                    if self._compilable(group, p, mult, buf):
                        compiled.append((p, mult, buf))
                        continue
                    if p.device not in use_triton:
                        use_triton[p.device] = self._triton_device(group, p.device)
                    if use_triton[p.device] and triton_kernels.takes(p, mult, grad, buf):
                        tri.append((p, mult, grad, buf))
                        continue
                    prepared = self._native_job(p, mult, native_kernel.prepare) if use_native else None
                    if prepared is not None and native_kernel.takes(p, grad, buf):
                        native.append((p, grad, buf, prepared))
                        continue
                    if self.scratch_bytes and not group["differentiable"] and _cuttable(p, grad, buf):
                        blocked.append((p, mult, buf))
                        continue
                    grad = mult.multiply(grad) if group["differentiable"] else mult.apply_sgd(grad)
                    whole += 1
                has_sparse |= grad.is_sparse
                params.append(p)
                grads.append(grad)
                if momentum:
                    buffers.append(buf)
            if params:
                self._sgd(group, params, grads, buffers, has_sparse)
                if momentum:
                    for p, buf in zip(params, buffers):
                        self.state[p]["momentum_buffer"] = buf
                self._took("whole", whole)
            if native:
                self._step_native(group, native)
                self._took("native", len(native))
            if tri:
                items = [(p, mult, grad, self._new_buffer(p) if momentum and buf is None else buf,
                          momentum and buf is None) for p, mult, grad, buf in tri]
                triton_kernels.sgd_step(items, group, getattr(self, "grad_scale", None),
                                        getattr(self, "found_inf", None))
                self._took("triton", len(tri))
            lr = group["lr"]
            if compiled and not isinstance(lr, Tensor):
                lr = torch.tensor(lr, dtype=compiled[0][0].dtype, device=compiled[0][0].device)
            for i, (p, mult, buf) in enumerate(compiled):
                first = momentum and buf is None
                try:
                    step_compiled(group, p, mult, self._new_buffer(p) if first else buf, lr, first)
                    self._took("compiled")
                except Exception as e:  # no C++ compiler, an unsupported backend...: the eager path is exact too
                    if i:  # a failure after a success is a bug, not a missing toolchain
                        raise
                    warnings.warn(f"RepOptSGD(compiled=True) could not compile its update ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); using its other paths", stacklevel=2)
                    self.compiled = False
                    blocked += compiled
                    break
            if blocked:
                # torch's fused SGD treats a call as a first step only when no buffer at all exists yet
                first = [item for item in blocked if momentum and item[2] is None]
                self._step_in_blocks(group, [item for item in blocked if not (momentum and item[2] is None)])
                for p, mult, _ in first:  # filled block by block below
                    self._new_buffer(p)
                self._step_in_blocks(group, [(p, m, None) for p, m, _ in first], first_step=True)
                self._took("blocks", len(blocked))
        return loss

    def _new_buffer(self, p: Tensor) -> Tensor:
        """p's momentum buffer, created for a first step (zeros: never uninitialised, even if that step fails)."""
        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return buf

    def _step_native(self, group, items: list) -> None:
        """The default path on CPU: one native call updates every float32/float64 target weight of the group."""
        momentum = group["momentum"] != 0
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        for p, grad, buf, (job, table) in items:
            first = momentum and buf is None
            if first:  # the kernel overwrites it
                buf = self._new_buffer(p)
            jobs, tensors = by_dtype.setdefault(p.dtype, ([], []))
            jobs.append(native_kernel.bind(job, p, grad, buf, first))
            tensors += [p, grad, buf, table]
        for dtype, (jobs, tensors) in by_dtype.items():
            native_kernel.sgd_step(jobs, group, dtype, tensors)

    def _compilable(self, group, p: Tensor, mult, buf: Tensor | None) -> bool:
        """The compiled path takes contiguous weights with branch scales (first steps included)."""
        return (self.compiled and isinstance(mult, BranchSet) and not group["differentiable"]
                and not self._unscale_pending() and p.is_contiguous() and p.grad.is_contiguous()
                and (buf is None or buf.is_contiguous())
                and native_kernel.disjoint([p, p.grad, *([buf] if buf is not None else [])]))

    def _step_in_blocks(self, group, blocked: list, first_step: bool = False) -> None:
        """The default path: M * G block by block into a small scratch, each full scratch one `sgd` call.

        first_step: no momentum buffers exist yet; torch creates one per block and they are copied into the full-size
        buffers already in self.state.
        """
        kinds: dict[tuple, list] = {}
        for item in blocked:
            kinds.setdefault((item[0].grad.device, item[0].grad.dtype), []).append(item)
        for (device, dtype), items in kinds.items():
            smallest = max(p[0].numel() * mult.row_alignment for p, mult, _ in items)
            total = sum(p.numel() for p, _, _ in items)
            capacity = max(min(self.scratch_bytes // dtype.itemsize, total), smallest)
            scratch = torch.empty(capacity, dtype=dtype, device=device)
            used, batch, targets = 0, ([], [], []), []
            for p, mult, buf in items:
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
