"""The opt-in compiled path of RepOptSGD (`compiled=True`): the multiply by M and torch's SGD update in one pass.

Eagerly, M * G costs a pass of its own over the gradient (RepOptSGD's block path keeps it in cache, but the extra
read still costs ~1.4-1.9x a fused torch SGD step on a CPU, docs/benchmarks.md). `torch.compile` turns the function
below into one loop that reads p, G and the momentum buffer once and writes p and the buffer once, like torch's fused
SGD. The price is compile time on the first steps (seconds per weight shape on a CPU, and a C++ compiler there).

The update is torch's single-tensor SGD written out (maximize, weight decay, momentum, dampening, nesterov), applied to
the weight viewed as (C_out, C_in/R, R*kh*kw) with the tap table repeated R times along the last axis, so the
multiplier is read contiguously. The identity branch's +G on the diagonal centre taps is not in the pattern: those
C_out entries are saved before, and redone after, by torch's own functional `sgd` on small vectors.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.sgd import sgd


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


def step_compiled(group: dict, p: Tensor, mult, buf: Tensor | None) -> None:
    """One RepOptSGD step of the target weight `p` (contiguous, momentum buffer present or momentum 0)."""
    grad = p.grad
    n, per_group = p.shape[:2]
    r = mult._pattern_repeat()
    table = mult.tap_table(2, grad.device, grad.dtype)
    taps = table[:, 0].flatten(1)
    pattern = taps.unsqueeze(1).expand(n, r, taps.shape[1]).reshape(n, 1, r * taps.shape[1])
    shape = (n, per_group // r, r * taps.shape[1])
    diagonal = None
    if mult.has_identity:  # saved before the update overwrites them
        views = [mult._diagonal_rows(t, 0) for t in (p, grad) + ((buf,) if buf is not None else ())]
        diagonal = [v.clone() for v in views]
    lr = group["lr"]
    lr = lr if isinstance(lr, Tensor) else torch.tensor(lr, dtype=grad.dtype, device=grad.device)
    compiled_update()(p.view(shape), grad.view(shape), None if buf is None else buf.view(shape), pattern, lr,
                      float(group["weight_decay"]), float(group["momentum"]), float(group["dampening"]),
                      bool(group["nesterov"]), bool(group["maximize"]))
    if diagonal is not None:
        p_d, g_d = diagonal[0], diagonal[1]
        b_d = diagonal[2] if buf is not None else None
        centre = table[:, 0, mult.geometry.centre[0], mult.geometry.centre[1]]
        m_g = g_d.flatten() * centre + g_d.flatten()  # the same two roundings as multiply_rows
        p_flat, bufs = p_d.flatten(), [] if b_d is None else [b_d.flatten()]
        sgd([p_flat], [m_g], bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=False, foreach=False, fused=False)
        views[0].copy_(p_flat.view_as(views[0]))
        if b_d is not None:
            views[2].copy_(bufs[0].view_as(views[2]))
