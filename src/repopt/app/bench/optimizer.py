"""The cost of the optimizer step alone: RepOptSGD against torch SGD with the same flags on the same gradients, and
the optimizer state RepOpt keeps beyond what torch SGD keeps."""
from __future__ import annotations

import time

import torch

from .timing import interleaved, paired_ratio, summary
from .workloads import SGD_FLAGS, arch_name, build, param_bytes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps between steps: its state, and RepOpt's multipliers (scale vectors and
    cached per-channel tables)."""
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    for mult in getattr(opt, "branch_sets", []):
        if mult is not None:
            total += mult.nbytes()
    return total


def _same_gradients(models, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for params in zip(*(m.parameters() for m in models)):
        grad = torch.randn(params[0].shape, generator=g).to(params[0].device, params[0].dtype)
        for p in params:
            p.grad = grad.clone()


def _eager_variant(arch, num_classes, scales, device, flags, models, model_options):
    """RepOptSGD(native=False): the eager block path, which the native kernel replaces on CPU."""
    model, opt = build("repopt", arch, num_classes, scales=scales, device=device, sgd_flags=flags, **model_options)
    opt.native = False
    models.append(model)
    return opt


def _compiled_variant(arch, num_classes, scales, device, flags, models, model_options) -> tuple:
    """RepOptSGD(compiled=True), stepped twice (eager first step, then the compile): (optimizer, compile seconds)."""
    model, opt = build("repopt", arch, num_classes, scales=scales, device=device, sgd_flags=flags, **model_options)
    opt.compiled = True
    models.append(model)
    _same_gradients(models)
    opt.step()  # the first step compiles its own variant (it creates the momentum buffers)
    t0 = time.perf_counter()
    opt.step()
    return opt, time.perf_counter() - t0


def optimizer_step(arch: str, num_classes: int, repeats: int, device="cpu", warmup: int = 2, scales=None,
                   sgd_flags: dict | None = None, sync=None, progress=None, compiled: bool = False,
                   **model_options) -> dict:
    """Time `step()` of torch SGD and RepOptSGD (same flags, same gradients), interleaved; report both and ratios.

    compiled: also time RepOptSGD(compiled=True) in the same rounds, and report its compile time.
    When the default path is the native kernel, the eager block path (native=False) is timed in the same rounds too.
    """
    from ...optim import native
    flags = dict(SGD_FLAGS if sgd_flags is None else sgd_flags)
    plain, opt_plain = build("plain", arch, num_classes, device=device, sgd_flags=flags, **model_options)
    rep, opt_rep = build("repopt", arch, num_classes, scales=scales, device=device, sgd_flags=flags,
                         **model_options)
    models, variants = [plain, rep], {"torch_sgd": opt_plain.step, "repopt_sgd": opt_rep.step}
    if torch.device(device).type == "cpu" and native.available():
        variants["repopt_sgd_eager"] = _eager_variant(arch, num_classes, scales, device, flags, models,
                                                      model_options).step
    compiled_info = None
    if compiled:
        opt_c, compile_s = _compiled_variant(arch, num_classes, scales, device, flags, models, model_options)
        compiled_info = {"compile_seconds": compile_s, "fell_back_to_eager": not opt_c.compiled}
        variants["repopt_sgd_compiled"] = opt_c.step
    _same_gradients(models)
    times = interleaved(variants, repeats, warmup, sync, progress)
    n_bytes = param_bytes(rep)
    extra = state_bytes(opt_rep) - state_bytes(opt_plain)
    targets = sum(p.numel() for p, m in zip((p for g in opt_rep.param_groups for p in g["params"]),
                                            opt_rep.branch_sets) if m is not None)
    out = {
        "arch": arch_name(arch), "params": sum(p.numel() for p in rep.parameters()),
        "params_with_multiplier": targets, "flags": {k: v for k, v in flags.items() if k != "lr"},
        "torch_sgd": summary(times["torch_sgd"]), "repopt_sgd": summary(times["repopt_sgd"]),
        "ratio": paired_ratio(times["repopt_sgd"], times["torch_sgd"]), "path": opt_rep.last_path,
        "param_bytes": n_bytes, "extra_state_bytes": extra, "extra_state_fraction": extra / n_bytes,
        "scratch_bytes_per_step": getattr(opt_rep, "scratch_bytes", 0),
    }
    if "repopt_sgd_eager" in times:
        out["repopt_sgd_eager"] = {**summary(times["repopt_sgd_eager"]),
                                   "ratio": paired_ratio(times["repopt_sgd_eager"], times["torch_sgd"])}
    if compiled_info is not None:
        out["repopt_sgd_compiled"] = {**summary(times["repopt_sgd_compiled"]), **compiled_info,
                                      "path": opt_c.last_path,
                                      "ratio": paired_ratio(times["repopt_sgd_compiled"], times["torch_sgd"])}
    return out
