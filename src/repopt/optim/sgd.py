"""RepOptSGD: torch SGD with the raw gradient of each target conv replaced by M * G (MATH (3)).

Weight decay, momentum, dampening, nesterov and maximize then act exactly as in torch.optim.SGD, in torch's own
order, through torch's functional `sgd` (so the single-tensor, foreach and fused paths and the fused AMP path are
torch's). `p.grad` is never modified: the multiplied gradient is a temporary.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from .base import RepOptMixin


class RepOptSGD(RepOptMixin, torch.optim.SGD):
    _default_weight_decay = 0.0

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 grad_mults: Mapping[Tensor, Any] | None = None):
        self._init_multipliers(grad_mults)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._check_all_bound()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params, grads, buffers = [], [], []
            has_sparse = False
            for p, mult in zip(group["params"], self._multipliers[gi]):
                if p.grad is None:
                    continue
                grad = p.grad
                if mult is not None:
                    if grad.is_sparse:
                        raise RuntimeError(f"{mult.name}: RepOptSGD does not support sparse gradients on a "
                                           f"parameter with a multiplier")
                    grad = mult.apply_sgd(grad)
                has_sparse |= grad.is_sparse
                params.append(p)
                grads.append(grad)
                if group["momentum"] != 0:
                    buffers.append(self.state[p].get("momentum_buffer"))
            if not params:
                continue
            sgd(params, grads, buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"], has_sparse_grad=has_sparse, foreach=group["foreach"],
                fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None))
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buf
        return loss
