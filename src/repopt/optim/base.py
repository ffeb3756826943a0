"""What the three RepOpt optimizers share: binding multipliers to parameters, the router, checkpoints, `from_scales`.

The multipliers are kept *next to* the param groups (one entry per parameter, by position), never inside
`optimizer.state`: torch's `load_state_dict` replaces the whole state, so anything stored there would vanish when a
checkpoint without it is loaded. `state_dict()` adds the per-channel scales under one extra key so that a resumed run
can be checked against the multipliers it started with.

A step is gather, route, dispatch, as in torch's own optimizers. The router (`_route`) gathers every param group's
parameters with a gradient, groups the target weights by device and dtype (torch's
`Optimizer._group_tensors_by_device_and_dtype`) and gives each the first row of the optimizer's PATHS table that
opens for its device and takes it (every backend's `takes(p, grad, mult, *state)`); then the backends picked ready
their code (`triton_kernels.warm_up`), all before any parameter or state changes, so a backend that cannot run
(`paths.PathUnavailable`) leaves nothing half done. The rows, in order:

    "compiled"  RepOptSGD(compiled=True) only (deprecated): one torch.compile'd kernel per contiguous weight
    "triton"    CUDA weights where triton imports (triton=None), or as required (triton=True): one multi-tensor
                launch per device and dtype (triton_kernels.py)
    "native"    float32/float64 CPU weights where the C kernels build (native.py): one call per dtype
    "blocks"    RepOptSGD: M * G block by block into a small scratch, then torch's sgd
    "whole"     RepOptSGD: M * G as a full-size temporary (what cannot be cut in blocks; differentiable=True)
    "eager"     RepOptAdamW / RepOptLion: the rule in tensor ops

Every step records which path updated each target weight (`last_step_paths`, `path_counts`), so that a proof or a
benchmark can assert the path it claims rather than the one asked for.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..branches import BranchSet, FixedMultiplier
from . import native as native_kernel
from . import triton_kernels
from .paths import PathUnavailable

STATE_KEY = "repopt"


class Path(NamedTuple):
    """A row of an optimizer's PATHS table, which the router tries in order for each target weight."""
    name: str
    opens: Callable[..., bool]  # (opt, group, device): may it run for this group's weights on device? (once a step)
    takes: Callable[..., bool]  # (opt, group, p, grad, mult, *state): does it take this weight?
    step: Callable[..., None]   # (opt, group, items): update the weights it took, all of one device and dtype


def _triton_by_default(device: torch.device) -> bool:
    """Does triton=None pick the Triton kernels for weights on `device`? CUDA only (on CPU tensors they run only in
    Triton's interpreter, for tests)."""
    return device.type == "cuda"


def always(*_) -> bool:
    return True


def _by_device_and_dtype(targets: list) -> list[list[int]]:
    """The indices of `targets` (tuples led by the weight) per device and dtype, by torch's optimizers' own grouping.
    While torch.compile traces, that grouping is left to inductor; then each weight is a batch of its own (a batch
    shares one scratch buffer, one dtype)."""
    if torch.compiler.is_compiling():
        return [[i] for i in range(len(targets))]
    groups = Optimizer._group_tensors_by_device_and_dtype([[t[0] for t in targets]], with_indices=True)
    return [indices for _, indices in groups.values()]


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
        """Record that `weights` target weights were updated by `path` (a row of PATHS) in this step."""
        if weights:
            self.last_step_paths[path] += weights
            self.path_counts[path] += weights

    # ---- the router: every target weight gets its path before any parameter or state changes ----------------------
    def _route(self) -> list[tuple[dict, list, list]]:
        """[(group, plain, batches)] for every param group: plain, its parameters without a multiplier that have a
        gradient; batches, [(path name, items)] of one device and dtype each, items (p, grad, mult, *state) with state
        as `_state_keys` names it (None where it does not exist yet). Each target weight takes the first row of
        `self.PATHS` that opens for its device and takes it; then the backends picked ready their code. Nothing has
        changed yet, so one that cannot (PathUnavailable) is refused in one sentence (triton=True) or, with one
        warning, left for the other paths (triton=None)."""
        while True:
            routed = []
            for gi, group in enumerate(self.param_groups):
                plain, targets = self._gather(gi, group)
                routed.append((group, plain, self._assign(group, targets)))
            try:
                self._warm_up(routed)
                return routed
            except PathUnavailable as e:
                if self.triton:
                    raise PathUnavailable(f"{type(self).__name__}(triton=True): {e}") from None
                warnings.warn(f"{type(self).__name__}: {e}; its target weights take the other paths (on CUDA the "
                              f"eager path) from now on", stacklevel=4)
                self.triton = False

    def _gather(self, gi: int, group) -> tuple[list, list]:
        plain, targets = [], []
        keys = self._state_keys(group)
        for p, mult in zip(group["params"], self._multipliers[gi]):
            if p.grad is None:
                continue
            if p.grad.is_sparse and mult is not None:
                raise RuntimeError(f"{mult.name}: {type(self).__name__} does not support sparse gradients on a "
                                   f"parameter with a multiplier")
            if p.grad.is_sparse and not self._sparse_plain:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if mult is None:
                plain.append(p)
            else:
                state = self.state.get(p)  # not self.state[p]: that would add an entry before the route is known
                targets.append((p, p.grad, mult, *(None if state is None else state.get(k) for k in keys)))
        return plain, targets

    _sparse_plain = False  # may parameters without a multiplier have sparse gradients?
    _STATE_KEYS: tuple[str, ...] = ()  # the state tensors of a target weight that its paths' `takes` check

    def _state_keys(self, group) -> tuple[str, ...]:
        return self._STATE_KEYS

    def _assign(self, group, targets: list) -> list[tuple[str, list]]:
        batches: list[tuple[str, list]] = []
        if not targets:
            return batches
        for indices in _by_device_and_dtype(targets):
            device = targets[indices[0]][0].device
            open_paths = [path for path in self.PATHS if path.opens(self, group, device)]
            taken: dict[str, list] = {}
            for i in indices:
                path = next(path for path in open_paths if path.takes(self, group, *targets[i]))
                taken.setdefault(path.name, []).append(targets[i])
            batches += taken.items()
        return batches

    def _warm_up(self, routed: list) -> None:
        """Ready the Triton kernels of every group's Triton batches (compiles on a first use; PathUnavailable)."""
        for group, _, batches in routed:
            params = [item[0] for name, items in batches if name == "triton" for item in items]
            if params:
                triton_kernels.warm_up(self._kind, group, params)

    def _dispatch(self, routed: list) -> None:
        """Run each batch on the kernel its path names (PATHS), after the plain parameters' torch step."""
        kernels = {path.name: path.step for path in self.PATHS}
        for group, plain, batches in routed:
            if plain:
                self._step_plain(group, plain)
            for name, items in batches:
                kernels[name](self, group, items)

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
        if native is True and not native_kernel.available():
            raise RuntimeError(f"{type(self).__name__}(native=True): the native kernel is unavailable "
                               f"({native_kernel.build_error() or 'turned off by REPOPT_NATIVE'})")
        self.native = native
        self._native_jobs: dict[Tensor, tuple] = {}  # per weight: (dtype, strides, device), its prepared job

    # ---- the Triton kernels (triton_kernels.py) for GPU weights -----------------------------------------------------
    def _init_triton(self, triton: bool | None) -> None:
        """triton: None (default) uses the multi-tensor Triton kernels for CUDA weights where triton imports, True
        requires them (on CPU tensors: only under TRITON_INTERPRET=1, for tests), False never."""
        if triton is True and triton_kernels._load() is None:
            raise RuntimeError(f"{type(self).__name__}(triton=True): triton cannot be imported "
                               f"({triton_kernels.error()}); pip install 'repopt[triton]'")
        self.triton = triton

    def _opens_triton(self, group, device: torch.device) -> bool:
        """May this step update `group`'s target weights on `device` with the Triton kernels?"""
        if self.triton is False or group.get("differentiable", False) or torch.compiler.is_compiling():
            return False
        if self.triton is None and not _triton_by_default(device):
            return False
        why = triton_kernels.usable(device)
        if why is not None and self.triton:
            raise RuntimeError(f"{type(self).__name__}(triton=True): {why}")
        if why is not None:
            self._say_once(f"{type(self).__name__}: {why}, so its target weights on {device} take the eager path, "
                           f"which forms M * G in a pass of its own over each gradient and runs several small "
                           f"kernels per weight where the Triton kernels run one launch per step")
        return why is None

    def _takes_triton(self, group, p: Tensor, grad: Tensor, mult, *state) -> bool:
        return triton_kernels.takes(p, grad, mult, *state)

    def _say_once(self, message: str) -> None:
        """A warning given once per optimizer (a step may ask every time it runs)."""
        said = self.__dict__.setdefault("_said", set())
        if message not in said:
            said.add(message)
            warnings.warn(message, stacklevel=4)

    def _unscale_pending(self) -> bool:
        """Has GradScaler handed this (fused) optimizer a scale to divide by and an inf flag to honour this step?"""
        return getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None

    def _opens_native(self, group, device: torch.device) -> bool:
        return device.type == "cpu" and self._native_allowed(group)

    def _takes_native(self, group, p: Tensor, grad: Tensor, mult, *state) -> bool:
        return (self._native_job(p, mult, self._native_prepare) is not None
                and native_kernel.takes(p, grad, mult, *state))

    def _native_allowed(self, group) -> bool:
        """The native kernels: not asked off, built here, no AMP unscaling pending, not traced by torch.compile."""
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
