"""The step of RepOptAdamW and RepOptLion against their plain counterparts (not among the five claimed figures: the
claim is about SGD, but users train with these too): torch's AdamW (fused=True) and Lion without multipliers, on the
same target model and gradients, interleaved, with each RepOpt optimizer on its default path and, where that is the
native kernel, on its eager path as well."""
from __future__ import annotations

import torch

from .optimizer import _same_gradients
from .timing import interleaved, paired_ratio, summary
from .workloads import arch_name, bench_scales, create

ADAMW_FLAGS = dict(lr=1e-3, weight_decay=0.05)
LION_FLAGS = dict(lr=1e-4, weight_decay=0.05)


def adaptive_steps(arch, num_classes: int, repeats: int, device="cpu", scales=None, sync=None, progress=None) -> dict:
    from ...optim import RepOptAdamW, RepOptLion, native, param_groups

    device = torch.device(device)
    scales = bench_scales(arch, num_classes) if scales is None else scales
    native_here = device.type == "cpu" and native.available()
    models, variants = [], {}

    def model():
        torch.manual_seed(0)
        m = create(arch, "target", num_classes).to(device)
        models.append(m)
        return m

    variants["torch_adamw"] = torch.optim.AdamW(param_groups(model(), ADAMW_FLAGS["weight_decay"]), fused=True,
                                                lr=ADAMW_FLAGS["lr"]).step
    variants["repopt_adamw"] = RepOptAdamW.from_scales(model(), scales, fused=True, **ADAMW_FLAGS).step
    variants["lion"] = RepOptLion(param_groups(model(), LION_FLAGS["weight_decay"]), lr=LION_FLAGS["lr"]).step
    variants["repopt_lion"] = RepOptLion.from_scales(model(), scales, **LION_FLAGS).step
    if native_here:
        variants["repopt_adamw_eager"] = RepOptAdamW.from_scales(model(), scales, fused=True, native=False,
                                                                 **ADAMW_FLAGS).step
        variants["repopt_lion_eager"] = RepOptLion.from_scales(model(), scales, native=False, **LION_FLAGS).step
    _same_gradients(models)
    times = interleaved(variants, repeats, warmup=2, sync=sync, progress=progress)
    out = {"arch": arch_name(arch), "path": variants["repopt_adamw"].__self__.last_path,
           "lion_path": variants["repopt_lion"].__self__.last_path,
           **{k: summary(v) for k, v in times.items()},
           "adamw_ratio": paired_ratio(times["repopt_adamw"], times["torch_adamw"]),
           "lion_ratio": paired_ratio(times["repopt_lion"], times["lion"])}
    if native_here:
        out["adamw_eager_ratio"] = paired_ratio(times["repopt_adamw_eager"], times["torch_adamw"])
        out["lion_eager_ratio"] = paired_ratio(times["repopt_lion_eager"], times["lion"])
    return out
