"""The opt-in compiled path of RepOptSGD (`compiled=True`): the multiply by M and torch's SGD update in one pass.

Eagerly, M * G costs a pass of its own over the gradient (RepOptSGD's block path keeps it in cache, but the extra
read still costs ~1.4-1.9x a fused torch SGD step on a CPU, docs/benchmarks.md). `torch.compile` turns the function
below into one loop that reads p, G and the momentum buffer once and writes p and the buffer once, like torch's fused
SGD. The price is compile time on the first steps (seconds per weight shape on a CPU, and a C++ compiler there).

The update is torch's single-tensor SGD written out (maximize, weight decay, momentum, dampening, nesterov), applied to
the weight viewed as (C_out, C_in/R, R*kh*kw) with the tap table repeated R times along the last axis, so the
multiplier is read contiguously. The identity branch's +G on the diagonal centre taps is not in the pattern: since the
update is linear in the gradient, those C_out entries get what the missing term adds to the buffer and the step.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _update(p: Tensor, g: Tensor, buf: Tensor | None, pattern: Tensor, lr: Tensor, weight_decay: float,
            momentum: float, dampening: float, nesterov: bool, maximize: bool) -> None:
    d = g * pattern
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d + weight_decay * p
    if momentum != 0:
        b = buf * momentum + d * (1 - dampening)
        buf.copy_(b)
        d = d + momentum * b if nesterov else b
    p.copy_(p - lr * d)


_compiled = None


def compiled_update():
    """The compiled `_update`, built once per process (torch.compile caches its kernels per shape and flags)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_update, fullgraph=True, dynamic=True)
    return _compiled


def step_compiled(group: dict, p: Tensor, mult, buf: Tensor | None, lr: Tensor) -> None:
    """One RepOptSGD step of the target weight `p` (contiguous, momentum buffer present or momentum 0).

    lr: group["lr"] as a 0-dim tensor, so that a scheduler changing it does not recompile.
    """
    grad = p.grad
    pattern = mult.tap_pattern(2, grad.device, grad.dtype)
    shape = (p.shape[0], p.shape[1] // mult._pattern_repeat(), pattern.shape[-1])
    missing = None
    if mult.has_identity:  # the identity's +G on the diagonal centre taps, not in the pattern: read it first
        missing = mult._diagonal_rows(grad, 0).clone()
    momentum, dampening = float(group["momentum"]), float(group["dampening"])
    compiled_update()(p.view(shape), grad.view(shape), None if buf is None else buf.view(shape), pattern, lr,
                      float(group["weight_decay"]), momentum, dampening, bool(group["nesterov"]),
                      bool(group["maximize"]))
    if missing is not None:
        # every term of the update is linear in the multiplied gradient, so the missing +G enters as what it adds
        # to the buffer and to the step (the same algebra as MATH (3), here for C_out entries)
        e = -missing if group["maximize"] else missing
        if momentum != 0:
            mult._diagonal_rows(buf, 0).add_(e, alpha=1 - dampening)
            step = 1 + momentum * (1 - dampening) if group["nesterov"] else 1 - dampening
        else:
            step = 1.0
        mult._diagonal_rows(p, 0).sub_(lr * step * e)
