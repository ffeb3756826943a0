"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") and its exact RepOpt form (MATH (5)).

    c = beta1 m + (1 - beta1) g;   p <- p (1 - lr wd) - lr L * sign(c);   m <- beta2 m + (1 - beta2) g

with L = 1 for plain parameters and L = sum_b |alpha_b| E_b(1) + D(1) for a target conv. torch has no Lion, so
RepOptLion without multipliers *is* the plain Lion. Target convs take (PATHS, routed in base.py before anything
changes) the Triton kernels on CUDA (triton_kernels.py), the native CPU kernel where it builds (native.py), else the
rule in tensor ops (`_step_rule`, which also steps the plain parameters).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import native as native_kernel
from . import triton_kernels
from .base import Path, RepOptMixin, always


def _prepare(p: Tensor, mult):
    return native_kernel.prepare_adaptive(p, mult, native_kernel.LION)


class RepOptLion(RepOptMixin, torch.optim.Optimizer):
    _default_weight_decay = 0.0
    _kind, _native_prepare, _STATE_KEYS = "lion", staticmethod(_prepare), ("exp_avg",)

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
        """Gather, route (every target weight's path is decided before anything changes), dispatch."""
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        self._dispatch(self._route())
        return loss

    # ---- the paths: PATHS (end of the class) is the table the router tries in order --------------------------------
    def _exp_avg(self, p: Tensor) -> Tensor:
        """p's moment, created now (zeros) on its first step."""
        state = self.state[p]
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["exp_avg"]

    def _step_plain(self, group, params: list) -> None:
        self._step_rule(group, [(p, p.grad, None) for p in params])

    def _step_eager(self, group, items: list) -> None:
        self._step_rule(group, [(p, grad, mult) for p, grad, mult, *_ in items])
        self._took("eager", len(items))

    def _step_rule(self, group, items: list) -> None:
        """The rule in tensor ops, one parameter at a time (mult None: L = 1)."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for p, grad, mult in items:
            exp_avg = self._exp_avg(p)
            grad = -grad if group["maximize"] else grad
            if grad is p.grad and not native_kernel.disjoint([p, grad, exp_avg]):
                grad = grad.clone()  # p is written before the gradient is last read
            if wd != 0:
                p.mul_(1 - lr * wd)
            update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
            if mult is not None:
                mult.multiply_rows(update, 0, update, power=1)  # in place: no second temporary
            p.add_(update, alpha=-lr)
            exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)

    def _step_triton(self, group, items: list) -> None:
        triton_kernels.lion_step([(p, mult, grad, self._exp_avg(p)) for p, grad, mult, *_ in items], group)
        self._took("triton", len(items))

    def _step_native(self, group, items: list) -> None:
        beta1, beta2 = group["betas"]
        jobs, tensors = [], []
        for p, grad, mult, *_ in items:
            exp_avg = self._exp_avg(p)
            job, coef = self._native_job(p, mult, _prepare)
            jobs.append(native_kernel.bind_adaptive(job, p, grad, exp_avg))
            tensors += [p, grad, exp_avg, coef]
        native_kernel.adaptive_step(jobs, native_kernel.LION, items[0][0].dtype, tensors, lr=float(group["lr"]),
                                    weight_decay=float(group["weight_decay"]), beta1=beta1, beta2=beta2,
                                    maximize=group["maximize"])
        self._took("native", len(items))

    # the router's table (base.py), in order of preference: Triton (CUDA), native (CPU), eager (which takes everything)
    PATHS = (Path("triton", RepOptMixin._opens_triton, RepOptMixin._takes_triton, _step_triton),
             Path("native", RepOptMixin._opens_native, RepOptMixin._takes_native, _step_native),
             Path("eager", always, always, _step_eager))
