"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") and its exact RepOpt form (MATH (5)).

    c = beta1 m + (1 - beta1) g;   p <- p (1 - lr wd) - lr L * sign(c);   m <- beta2 m + (1 - beta2) g

with L = 1 for plain parameters and L = sum_b |alpha_b| E_b(1) + D(1) for a target conv. torch has no Lion, so
RepOptLion without multipliers *is* the plain Lion.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import native as native_kernel
from . import triton_kernels
from .base import RepOptMixin


def _prepare(p: Tensor, mult):
    return native_kernel.prepare_adaptive(p, mult, native_kernel.LION)


class RepOptLion(RepOptMixin, torch.optim.Optimizer):
    _default_weight_decay = 0.0

    def __init__(self, params, lr: float | Tensor = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, *,
                 maximize: bool = False, grad_mults: Mapping[Tensor, Any] | None = None, native: bool | None = None,
                 triton: bool | None = None):
        """native: update float32/float64 CPU target weights with the native kernel (repopt/optim/native.py). None
        (default): where it builds on this machine; True: refuse to run without it; False: never.
        triton: update CUDA target weights with one multi-tensor Triton launch per step (triton_kernels.py). None
        (default): where triton imports; True: require it; False: never."""
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self._init_native(native)
        self._init_triton(triton)
        self._init_multipliers(grad_mults)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      differentiable=False))
        self._check_all_bound()

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            use_native, fast, tri = self._native_allowed(group), {}, []
            use_triton: dict[torch.device, bool] = {}
            for p, mult in zip(group["params"], self._multipliers[gi]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                # the one place that picks a target weight's path: Triton (GPU), native (CPU), eager
                if mult is not None and p.device not in use_triton:
                    use_triton[p.device] = self._triton_device(group, p.device)
                if mult is not None and use_triton[p.device] and triton_kernels.takes(p, mult, p.grad, exp_avg):
                    tri.append((p, mult, p.grad, exp_avg))
                    continue
                job = self._native_job(p, mult, _prepare) if use_native and mult is not None else None
                if job is not None and native_kernel.takes(p, p.grad, exp_avg):
                    jobs, tensors = fast.setdefault(p.dtype, ([], []))
                    jobs.append(native_kernel.bind_adaptive(job[0], p, p.grad, exp_avg))
                    tensors += [p, p.grad, exp_avg, job[1]]
                    continue
                grad = -p.grad if group["maximize"] else p.grad
                if grad is p.grad and not native_kernel.disjoint([p, grad, exp_avg]):
                    grad = grad.clone()  # p is written before the gradient is last read
                if wd != 0:
                    p.mul_(1 - lr * wd)
                update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
                if mult is not None:
                    mult.multiply_rows(update, 0, update, power=1)  # in place: no second temporary
                    self._took("eager")
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
            if tri:
                triton_kernels.lion_step(tri, group)
                self._took("triton", len(tri))
            for dtype, (jobs, tensors) in fast.items():
                self._took("native", len(jobs))
                native_kernel.adaptive_step(jobs, native_kernel.LION, dtype, tensors, lr=float(lr),
                                            weight_decay=float(wd), beta1=beta1, beta2=beta2,
                                            maximize=group["maximize"])
        return loss
