"""RepOptAdamW: the exact gradient re-parameterization of AdamW (MATH (4)).

One pair of moments (m, v) of the raw gradient G is kept per parameter, under torch's own state keys; a target conv's
step is  W' <- W' (1 - lr wd) - lr m_hat * U  with U from the branch scales, instead of m_hat / (sqrt(v_hat) + eps).
Parameters without branch scales go through torch's functional `adamw` unchanged (all its paths). Target convs take
the native CPU kernel where it builds (native.py: the whole update in one pass, float32/float64 CPU weights), else the
eager tensor ops of `_step_target`. Both round every operation alike except the square root: torch's CPU sqrt is not
correctly rounded (the kernel's is), so the two differ by at most eps |p'| + 8 eps |step| per step
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
from .base import RepOptMixin


def _prepare(p: Tensor, mult):
    return native_kernel.prepare_adaptive(p, mult, native_kernel.ADAMW)


class RepOptAdamW(RepOptMixin, torch.optim.AdamW):
    _accepts_fixed_multiplier = False
    _default_weight_decay = 1e-2

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
        loss = self._evaluate_closure(closure)
        self._begin_step_paths()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for gi, group in enumerate(self.param_groups):
            plain = ([], [], [], [], [], [])
            use_native, fast, tri = self._native_allowed(group), [], []
            use_triton: dict[torch.device, bool] = {}
            for p, bs in zip(group["params"], self._multipliers[gi]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RepOptAdamW does not support sparse gradients")
                state = self._state_of(p, group, target=bs is not None)
                if bs is None:
                    for lst, item in zip(plain, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                                 state.get("max_exp_avg_sq"), state["step"])):
                        if item is not None:
                            lst.append(item)
                else:  # the one place that picks a target weight's path: Triton (GPU), native (CPU), eager
                    moments = (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
                    if p.device not in use_triton:
                        use_triton[p.device] = self._triton_device(group, p.device)
                    if use_triton[p.device] and triton_kernels.takes(p, bs, p.grad, *moments):
                        tri.append((p, bs, p.grad, *moments, state))
                        continue
                    job = self._native_job(p, bs, _prepare) if use_native else None
                    if job is not None and native_kernel.takes(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                                               state.get("max_exp_avg_sq")):
                        fast.append((p, p.grad, state, job))
                    else:
                        self._step_target(p, bs, state, group, grad_scale, found_inf)
                        self._took("eager")
            if fast:
                self._step_native(group, fast)
                self._took("native", len(fast))
            if tri:
                self._step_triton(group, tri, grad_scale, found_inf)
                self._took("triton", len(tri))
            if plain[0]:
                beta1, beta2 = group["betas"]
                adamw(*plain, foreach=group["foreach"], capturable=group["capturable"],
                      differentiable=group["differentiable"], fused=group["fused"], grad_scale=grad_scale,
                      found_inf=found_inf, amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                      weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])
        return loss

    @staticmethod
    def _step_triton(group, tri: list, grad_scale, found_inf) -> None:
        """The target weights of a group in one Triton launch per dtype and step count. Under GradScaler found_inf is
        read on the host (one sync per step): a skipped step must not count."""
        if found_inf is not None and bool(found_inf.item()):
            return
        calls: dict[float, list] = {}
        for *item, state in tri:
            state["step"] += 1
            calls.setdefault(float(state["step"]), []).append(tuple(item))
        for step, items in calls.items():
            triton_kernels.adamw_step(items, group, step, grad_scale)

    @staticmethod
    def _step_native(group, fast: list) -> None:
        """The target weights of a group in one native call per dtype and step count (the bias corrections)."""
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        lr = float(lr.item() if isinstance(lr, Tensor) else lr)
        calls: dict[tuple, tuple[list, list]] = {}
        for p, grad, state, (job, coef) in fast:
            state["step"] += 1
            jobs, tensors = calls.setdefault((p.dtype, float(state["step"])), ([], []))
            moments = (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
            jobs.append(native_kernel.bind_adaptive(job, p, grad, *moments))
            tensors += [p, grad, *moments, coef]
        for (dtype, step), (jobs, tensors) in calls.items():
            native_kernel.adaptive_step(jobs, native_kernel.ADAMW, dtype, tensors, lr=lr,
                                        weight_decay=float(group["weight_decay"]), beta1=beta1, beta2=beta2,
                                        eps=float(group["eps"]), maximize=group["maximize"],
                                        bias_correction1=1 - beta1 ** step,
                                        bias_correction2_sqrt=math.sqrt(1 - beta2 ** step), amsgrad=group["amsgrad"])

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
