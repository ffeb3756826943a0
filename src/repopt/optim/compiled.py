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


def _update(p: Tensor, g: Tensor, buf: Tensor | None, pattern: Tensor, lr: Tensor, hyper: Tensor) -> None:
    """hyper = [weight_decay, momentum, 1 - dampening, nesterov, first] (0/1 for the flags), and lr, are tensors:
    values, not constants, so that no setting, schedule or first step compiles a variant of its own (torch.compile
    allows 8 per function; the proofs alone met that limit when the flags were Python constants). Each flag selects by
    a product with 0 or 1, which is exact. maximize is in the sign of `pattern`."""
    wd, mom, keep, nesterov, first = hyper.unbind()
    d = g * pattern + wd * p
    if buf is not None:  # momentum
        b = first * d + (1 - first) * (buf * mom + d * keep)  # torch: the first buffer is the update itself
        buf.copy_(b)
        d = nesterov * (d + mom * b) + (1 - nesterov) * b
    p.copy_(p - lr * d)


_compiled = None


def compiled_update():
    """The compiled `_update`, built once per process (one kernel per dtype and device, with momentum or without;
    shapes are dynamic)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_update, fullgraph=True, dynamic=True)
    return _compiled


def step_compiled(group: dict, p: Tensor, mult, buf: Tensor | None, lr: Tensor, first: bool = False) -> None:
    """One RepOptSGD step of the target weight `p` (contiguous; buf None only when momentum is 0).

    lr: group["lr"] as a 0-dim tensor, so that a scheduler changing it does not recompile.
    first: the buffer is new (any contents): this step sets it to the update, as torch's first SGD step does.
    """
    grad = p.grad
    pattern = mult.tap_pattern(2, grad.device, grad.dtype)
    if group["maximize"]:
        pattern = -pattern
    shape = (p.shape[0], p.shape[1] // mult._pattern_repeat(), pattern.shape[-1])
    missing = None
    if mult.has_identity:  # the identity's +G on the diagonal centre taps, not in the pattern: read it first
        missing = mult._diagonal_rows(grad, 0).clone()
    momentum, dampening = float(group["momentum"]), float(group["dampening"])
    hyper = torch.tensor([float(group["weight_decay"]), momentum, 1 - dampening, float(bool(group["nesterov"])),
                          float(bool(first))], dtype=p.dtype, device=p.device)
    compiled_update()(p.view(shape), grad.view(shape), None if buf is None else buf.view(shape), pattern, lr, hyper)
    if missing is not None:
        # every term of the update is linear in the multiplied gradient, so the missing +G enters as what it adds
        # to the buffer and to the step (the same algebra as MATH (3), here for C_out entries)
        e = -missing if group["maximize"] else missing
        if momentum != 0:
            keep = 1.0 if first else 1 - dampening
            mult._diagonal_rows(buf, 0).add_(e, alpha=keep)
            step = 1 + momentum * keep if group["nesterov"] else keep
        else:
            step = 1.0
        mult._diagonal_rows(p, 0).sub_(lr * step * e)
