"""RepOptAdamW: the exact gradient re-parameterization of AdamW (MATH (4)).

One pair of moments (m, v) of the raw gradient G is kept per parameter, under torch's own state keys; a target conv's
step is  W' <- W' (1 - lr wd) - lr m_hat * U  with U from the branch scales, instead of m_hat / (sqrt(v_hat) + eps).
Parameters without branch scales go through torch's functional `adamw` unchanged (all its paths). Target convs take
(PATHS, routed in base.py before anything changes) the Triton kernels on CUDA (triton_kernels.py), the native CPU
kernel where it builds (native.py: the whole update in one pass, float32/float64 CPU weights), else the eager tensor
ops of `_step_target`. The native and eager paths round every operation alike except the square root: torch's CPU
sqrt is not correctly rounded (the kernel's is), so the two differ by at most eps |p'| + 8 eps |step| per step
(tests/test_native.py); with a correctly rounded sqrt they agree bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from . import native as native_kernel
from . import triton_kernels
from .base import Path, RepOptMixin, always


def _prepare(p: Tensor, mult):
    return native_kernel.prepare_adaptive(p, mult, native_kernel.ADAMW)


class RepOptAdamW(RepOptMixin, torch.optim.AdamW):
    _accepts_fixed_multiplier = False
    _default_weight_decay = 1e-2
    _kind, _native_prepare = "adamw", staticmethod(_prepare)
    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, grad_mults: Mapping[Tensor, Any] | None = None,
                 native: bool | None = None, triton: bool | None = None):
        """native: update float32/float64 CPU target weights with the native kernel (repopt/optim/native.py). None
        (default): where it builds on this machine; True: refuse to run without it; False: never.
        triton: update CUDA target weights with one multi-tensor Triton launch per step (triton_kernels.py). None
        (default): where triton imports; True: require it; False: never."""
        if differentiable:
            raise ValueError("RepOptAdamW does not support differentiable=True: its target-conv update is not written "
                             "for autograd (RepOptSGD supports it)")
        if capturable:
            raise ValueError("RepOptAdamW does not support capturable=True: its target-conv step reads the step count "
                             "on the host, which CUDA graph capture forbids")
        self._init_native(native)
        self._init_triton(triton)
        self._init_multipliers(grad_mults)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._check_all_bound()

    def _state_of(self, p: Tensor, group, target: bool) -> dict:
        state = self.state[p]
        if len(state) == 0:
            # torch's fused path keeps the step count on the device; a target conv's step reads it on the host
            on_device = (group["capturable"] or group["fused"]) and not target
            state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if on_device
                             else torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Gather, route (every target weight's path is decided before anything changes), dispatch."""
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        self._dispatch(self._route())
        return loss

    # ---- the paths: PATHS (end of the class) is the table the router tries in order --------------------------------
    def _step_plain(self, group, params: list) -> None:
        """Parameters without branch scales: torch's functional adamw, as torch.optim.AdamW steps them."""
        plain = ([], [], [], [], [], [])
        for p in params:
            state = self._state_of(p, group, target=False)
            for lst, item in zip(plain, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                         state.get("max_exp_avg_sq"), state["step"])):
                if item is not None:
                    lst.append(item)
        beta1, beta2 = group["betas"]
        adamw(*plain, foreach=group["foreach"], capturable=group["capturable"],
              differentiable=group["differentiable"], fused=group["fused"],
              grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
              amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    def _moments(self, group, p: Tensor) -> tuple[dict, tuple]:
        """p's state (created now on a first step) and its moments (exp_avg, exp_avg_sq, max_exp_avg_sq or None)."""
        state = self._state_of(p, group, target=True)
        return state, (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))

    def _step_triton(self, group, items: list) -> None:
        """The target weights of a group in one Triton launch per step count. Under GradScaler found_inf is read on
        the host (one sync per step): a skipped step must not count."""
        states = [(p, mult, grad, *self._moments(group, p)) for p, grad, mult, *_ in items]
        self._took("triton", len(items))
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return
        calls: dict[float, list] = {}
        for p, mult, grad, state, moments in states:
            state["step"] += 1
            calls.setdefault(float(state["step"]), []).append((p, mult, grad, *moments))
        for step, batch in calls.items():
            triton_kernels.adamw_step(batch, group, step, getattr(self, "grad_scale", None))

    def _step_native(self, group, items: list) -> None:
        """The target weights of a group in one native call per step count (the bias corrections)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr = float(lr.item() if isinstance(lr, Tensor) else lr)
        calls: dict[float, tuple[list, list]] = {}
        for p, grad, mult, *_ in items:
            state, moments = self._moments(group, p)
            job, coef = self._native_job(p, mult, _prepare)
            state["step"] += 1
            jobs, tensors = calls.setdefault(float(state["step"]), ([], []))
            jobs.append(native_kernel.bind_adaptive(job, p, grad, *moments))
            tensors += [p, grad, *moments, coef]
        for step, (jobs, tensors) in calls.items():
            native_kernel.adaptive_step(jobs, native_kernel.ADAMW, items[0][0].dtype, tensors, lr=lr,
                                        weight_decay=float(group["weight_decay"]), beta1=beta1, beta2=beta2,
                                        eps=float(group["eps"]), maximize=group["maximize"],
                                        bias_correction1=1 - beta1 ** step,
                                        bias_correction2_sqrt=math.sqrt(1 - beta2 ** step), amsgrad=group["amsgrad"])
        self._took("native", len(items))

    def _step_eager(self, group, items: list) -> None:
        for p, _, mult, *_ in items:
            self._step_target(p, mult, self._state_of(p, group, target=True), group,
                              getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        self._took("eager", len(items))

    @staticmethod
    def _step_target(p: Tensor, bs, state: dict, group, grad_scale, found_inf) -> None:
        if found_inf is not None and bool(found_inf.item()):
            return  # the fused AMP path skips the whole step on inf/nan, and so do we
        grad = p.grad if grad_scale is None else p.grad / grad_scale
        if grad is p.grad and not native_kernel.disjoint([p, grad, *(t for t in state.values() if t.ndim)]):
            grad = grad.clone()  # p and the moments are written before the gradient is last read
        if group["maximize"]:
            grad = -grad
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state["step"] += 1
        step = float(state["step"])
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
            exp_avg_sq = state["max_exp_avg_sq"]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        factor = bs.adamw_factor(exp_avg_sq.sqrt() / bias_correction2_sqrt, eps)
        p.addcmul_(exp_avg, factor, value=-lr / bias_correction1)

    # the router's table (base.py), in order of preference: Triton (CUDA), native (CPU), eager (which takes everything)
    PATHS = (Path("triton", RepOptMixin._opens_triton, RepOptMixin._takes_triton, _step_triton),
             Path("native", RepOptMixin._opens_native, RepOptMixin._takes_native, _step_native),
             Path("eager", always, always, _step_eager))
