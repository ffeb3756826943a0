"""Whole training steps (forward, backward, optimizer step) of plain / repopt / repvgg on one architecture, timed
interleaved on the same batch."""
from __future__ import annotations

from .timing import interleaved, paired_ratio, summary
from .workloads import arch_name, batch, build, train_step


def training_steps(arch: str, image_size: int, batch_size: int, repeats: int, methods=("plain", "repopt", "repvgg"),
                   num_classes: int = 1000, device="cpu", warmup: int = 1, scales=None, sync=None, progress=None,
                   **model_options) -> dict:
    """Seconds per training step and images/s of each method; ratios against plain and repvgg where both ran."""
    x, y = batch(batch_size, image_size, num_classes, device)
    variants = {}
    for method in methods:
        model, opt = build(method, arch, num_classes, scales=scales, device=device, **model_options)
        variants[method] = (lambda m=model, o=opt: train_step(m, o, x, y))
    times = interleaved(variants, repeats, warmup, sync, progress)
    out = {"arch": arch_name(arch), "image_size": image_size, "batch_size": batch_size}
    for method, t in times.items():
        out[method] = {**summary(t), "images_per_s": batch_size / summary(t)["median_s"]}
    if "repopt" in times and "plain" in times:
        out["step_ratio_repopt_vs_plain"] = paired_ratio(times["repopt"], times["plain"])
    if "repopt" in times and "repvgg" in times:
        # throughput ratio = repvgg step time / repopt step time
        out["throughput_ratio_repopt_vs_repvgg"] = paired_ratio(times["repvgg"], times["repopt"])
    return out
