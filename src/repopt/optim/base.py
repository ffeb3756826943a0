"""What the three RepOpt optimizers share: binding multipliers to parameters, checkpoints, and `from_scales`.

The multipliers are kept *next to* the param groups (one entry per parameter, by position), never inside
`optimizer.state`: torch's `load_state_dict` replaces the whole state, so anything stored there would vanish when a
checkpoint without it is loaded. `state_dict()` adds the per-channel scales under one extra key so that a resumed run
can be checked against the multipliers it started with.

Every step records which path updated each target weight (`last_step_paths`, `path_counts`: "native", "compiled",
"blocks", "whole", "eager"), so that a proof or a benchmark can assert the path it claims rather than the one asked for.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..branches import BranchSet, FixedMultiplier

STATE_KEY = "repopt"


class RepOptMixin:
    """Mixed into a torch.optim.Optimizer subclass; `grad_mults` maps parameters to a BranchSet or a full tensor."""

    _accepts_fixed_multiplier = True

    def _init_multipliers(self, grad_mults: Mapping[Tensor, Any] | None) -> None:
        self._pending_mults = {}
        for p, spec in (grad_mults or {}).items():
            if isinstance(spec, Tensor):
                if not self._accepts_fixed_multiplier:
                    raise TypeError(f"{type(self).__name__} needs branch scales (a repopt.BranchSet) for every "
                                    f"multiplier: a plain tensor has no exact form for this optimizer")
                if spec.shape != p.shape:
                    raise ValueError(f"a multiplier of shape {tuple(spec.shape)} was given for a parameter of shape "
                                     f"{tuple(p.shape)}")
                spec = FixedMultiplier(spec)
            elif isinstance(spec, BranchSet):
                if tuple(spec.geometry.weight_shape) != tuple(p.shape):
                    raise ValueError(f"{spec.name}: branch set for a weight of shape {spec.geometry.weight_shape} "
                                     f"was given for a parameter of shape {tuple(p.shape)}")
            else:
                raise TypeError(f"grad_mults values must be repopt.BranchSet or Tensor, got {type(spec).__name__}")
            self._pending_mults[p] = spec
        self._multipliers: list[list] = []
        self._init_paths()

    # ---- which path updated each target weight (the proofs and benchmarks assert the path they claim) ---------------
    def _init_paths(self) -> None:
        self.path_counts: Counter[str] = Counter()  # target-weight updates per path since construction
        self.last_step_paths: Counter[str] = Counter()  # the same, for the latest step() (empty: skipped)

    def _begin_step_paths(self) -> None:
        self.last_step_paths = Counter()

    @property
    def last_path(self) -> str:
        """The path(s) of the latest step, e.g. "native" or "blocks+whole" ("" when it was skipped)."""
        return "+".join(sorted(self.last_step_paths))

    def _took(self, path: str, weights: int = 1) -> None:
        """Record that `weights` target weights were updated by `path` ("native", "compiled", "blocks", "whole" or
        "eager") in this step."""
        if weights:
            self.last_step_paths[path] += weights
            self.path_counts[path] += weights

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        pending = getattr(self, "_pending_mults", {})
        self._multipliers.append([pending.pop(p, None) for p in self.param_groups[-1]["params"]])

    def _check_all_bound(self) -> None:
        if self._pending_mults:
            names = ", ".join(getattr(s, "name", "?") for s in self._pending_mults.values())
            raise ValueError(f"grad_mults names parameters that are not in the optimizer's params: {names}")
        del self._pending_mults

    # ---- the native CPU kernels (native.py) ---------------------------------------------------------------------
    def _init_native(self, native: bool | None) -> None:
        """native: None (default) uses the kernels where they build, True refuses to run without them, False never."""
        from . import native as native_kernel

        if native is True and not native_kernel.available():
            raise RuntimeError(f"{type(self).__name__}(native=True): the native kernel is unavailable "
                               f"({native_kernel.build_error() or 'turned off by REPOPT_NATIVE'})")
        self.native = native
        self._native_jobs: dict[Tensor, tuple] = {}  # per weight: (dtype, strides, device), its prepared job

    # ---- the Triton kernels (triton_kernels.py) for GPU weights -----------------------------------------------------
    def _init_triton(self, triton: bool | None) -> None:
        """triton: None (default) uses the multi-tensor Triton kernels for CUDA weights where triton imports, True
        requires them (on CPU tensors: only under TRITON_INTERPRET=1, for tests), False never."""
        if triton is True:
            from . import triton_kernels

            if triton_kernels._load() is None:
                raise RuntimeError(f"{type(self).__name__}(triton=True): triton cannot be imported "
                                   f"({triton_kernels.error()}); pip install 'repopt[triton]'")
        self.triton = triton

    def _triton_device(self, group, device: torch.device) -> bool:
        """May this step update `group`'s target weights on `device` with the Triton kernels?"""
        if self.triton is False or group.get("differentiable", False) or torch.compiler.is_compiling():
            return False
        if self.triton is None and device.type != "cuda":
            return False
        from . import triton_kernels

        why = triton_kernels.usable(device)
        if why is not None and self.triton:
            raise RuntimeError(f"{type(self).__name__}(triton=True): {why}")
        return why is None

    def _unscale_pending(self) -> bool:
        """Has GradScaler handed this (fused) optimizer a scale to divide by and an inf flag to honour this step?"""
        return getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None

    def _native_allowed(self, group) -> bool:
        """The native kernels: not asked off, built here, no AMP unscaling pending, not traced by torch.compile."""
        from . import native as native_kernel

        return (self.native is not False and not group.get("differentiable", False) and not self._unscale_pending()
                and not torch.compiler.is_compiling() and native_kernel.available())

    def _native_job(self, p: Tensor, mult, prepare):
        """p's job prepared by `prepare(p, mult)` (None: not for the kernel), kept until p's dtype or layout changes."""
        key = (p.dtype, p.stride(), p.device)
        cached = self._native_jobs.get(p)
        if cached is None or cached[0] != key:
            cached = self._native_jobs[p] = (key, prepare(p, mult))
        return cached[1]

    @staticmethod
    def _evaluate_closure(closure):
        """torch's closure convention for step(): re-evaluate the loss with grad enabled, return it (or None)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def multiplier_of(self, group_index: int, param_index: int):
        return self._multipliers[group_index][param_index]

    @property
    def branch_sets(self) -> list:
        """Every bound multiplier, in parameter order (None for parameters that follow the plain rule)."""
        return [m for group in self._multipliers for m in group]

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        saved = {}
        for i, mult in enumerate(self.branch_sets):
            if isinstance(mult, BranchSet):
                saved[i] = {k: v.clone() for k, v in mult.scales().items()}
            elif isinstance(mult, FixedMultiplier):
                saved[i] = {"__tensor__": mult.mult.detach().cpu().clone()}
        sd[STATE_KEY] = {"version": 1, "multipliers": saved}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(STATE_KEY, None)
        if saved is not None:
            self._check_same_multipliers(saved["multipliers"])
        super().load_state_dict(state_dict)

    def _check_same_multipliers(self, saved: Mapping[int, Mapping[str, Tensor]]) -> None:
        for i, mult in enumerate(self.branch_sets):
            entry = saved.get(i)
            if mult is None and entry is None:
                continue
            name = getattr(mult, "name", f"parameter {i}")
            if (mult is None) != (entry is None):
                raise ValueError(f"this checkpoint was saved with {'no ' if entry is None else ''}multiplier for "
                                 f"{name}; a resumed RepOpt run must keep the multipliers it started with")
            current = ({"__tensor__": mult.mult.cpu()} if isinstance(mult, FixedMultiplier) else mult.scales())
            same = current.keys() == entry.keys() and all(
                torch.equal(current[k].to(torch.float64), entry[k].cpu().to(torch.float64)) for k in current)
            if not same:
                raise ValueError(f"the checkpoint's multiplier for {name} differs from this optimizer's (other "
                                 f"scales?); a resumed RepOpt run must keep the multipliers it started with")

    # ---- the usual way in ------------------------------------------------------------------------------------------
    @classmethod
    def from_scales(cls, model: nn.Module, scales, *, reinit: bool = True, identity_init: str | float = "searched",
                    force_reinit: bool = False, strict: bool = True, params=None,
                    generator: torch.Generator | None = None, **optimizer_kwargs):
        """Validate `scales` against `model`, apply the rule of initialization once, and build the optimizer.

        scales: a repopt.Scales or {conv_module_name: {"3x3": Tensor[C_out], "1x1": ..., "identity": ...}}.
        reinit: apply the rule of initialization to every target conv (refused on a model whose BatchNorms look
            trained, unless force_reinit=True; pass reinit=False when resuming or fine-tuning).
        params: param groups to use; by default `repopt.param_groups(model, weight_decay)` (no decay on 1-D params).
        """
        from ..reinit import apply_rule_of_initialization
        from ..scales import as_scales
        from .groups import param_groups

        bound = as_scales(scales).bind(model, strict=strict)
        if reinit:
            apply_rule_of_initialization(model, bound, identity_init=identity_init, force=force_reinit,
                                         generator=generator)
        if params is None:
            params = param_groups(model, weight_decay=optimizer_kwargs.pop("weight_decay",
                                                                             cls._default_weight_decay))
        mults = {conv.weight: bs for conv, bs in bound.values()}
        return cls(params, grad_mults=mults, **optimizer_kwargs)
