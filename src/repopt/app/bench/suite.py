"""`repopt bench`: every figure of the performance claim, measured side by side in one run.

    optimizer_step_ratio               RepOptSGD step / torch SGD step (same flags, fused=True), same gradients
                                       (the default path: the native kernel on CPU where it builds;
                                       details.optimizer.repopt_sgd_eager: native=False,
                                       details.optimizer.repopt_sgd_compiled: compiled=True)
    optimizer_extra_state_fraction     optimizer state RepOpt keeps beyond torch SGD's, / parameter bytes
    train_step_ratio_vs_plain          RepOpt-VGG training step / the same target model trained by torch SGD
    train_throughput_ratio_vs_repvgg   RepOpt-VGG images/s / RepVGG images/s (same arch), worst image size
    peak_memory_ratio_vs_repvgg        peak training memory RepOpt-VGG / RepVGG (medians of fresh processes), worst
                                       image size

Ratios are medians of per-round ratios of interleaved runs (see timing.py); absolute times are kept next to them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .adaptive import adaptive_steps
from .memory import peak_memory
from .optimizer import optimizer_step
from .timing import environment, load_average
from .training import training_steps

KEYS = ("optimizer_step_ratio", "optimizer_extra_state_fraction", "train_step_ratio_vs_plain",
        "train_throughput_ratio_vs_repvgg", "peak_memory_ratio_vs_repvgg")
# the targets of the claim: (comparison, bound)
TARGETS = {"optimizer_step_ratio": ("<=", 1.3), "optimizer_extra_state_fraction": ("<=", 0.05),
           "train_step_ratio_vs_plain": ("<=", 1.03), "train_throughput_ratio_vs_repvgg": (">=", 1.25),
           "peak_memory_ratio_vs_repvgg": ("<=", 0.75)}


@dataclass
class TrainSetting:
    arch: str
    image_size: int
    batch_size: int
    repeats: int
    methods: tuple[str, ...] = ("plain", "repopt", "repvgg")


@dataclass
class SuiteConfig:
    optimizer_arch: str = "repopt_vgg_b1"
    optimizer_repeats: int = 15
    optimizer_compiled: bool = True  # also time RepOptSGD(compiled=True) (compiles for ~10 s on a CPU)
    adaptive_repeats: int = 7  # RepOptAdamW / RepOptLion steps against torch AdamW / Lion (details only); 0: skip
    num_classes: int = 1000
    train: list[TrainSetting] = field(default_factory=lambda: [
        TrainSetting("repopt_vgg_b1", 32, 64, 7),
        TrainSetting("repopt_vgg_a0", 224, 64, 3, ("repopt", "repvgg")),  # B1 at 224 is minutes per step on CPU
    ])
    memory_steps: int = 2
    memory_repeats: int = 3  # fresh processes per method and size (the median is reported)

    @classmethod
    def quick(cls) -> "SuiteConfig":
        """Seconds, for tests and a first look: the tiny preset, small batches."""
        return cls(optimizer_arch="repopt_vgg_tiny", optimizer_repeats=5, optimizer_compiled=False, num_classes=10,
                   adaptive_repeats=3,
                   train=[TrainSetting("repopt_vgg_tiny", 32, 8, 3)], memory_steps=1, memory_repeats=1)


def _count_units(cfg: SuiteConfig) -> int:
    """Progress units: optimizer rounds, training rounds, memory processes."""
    return (cfg.optimizer_repeats + 2 + (cfg.adaptive_repeats + 2 if cfg.adaptive_repeats else 0)
            + sum(s.repeats + 1 for s in cfg.train)
            + 2 * cfg.memory_repeats * len(cfg.train))


def run_suite(cfg: SuiteConfig | None = None, device="cpu", progress: bool = False) -> dict:
    cfg = cfg or SuiteConfig()
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=_count_units(cfg), desc="bench", unit="round", leave=False)
    tick = bar.update if bar is not None else None
    try:
        env = environment(device)
        opt = optimizer_step(cfg.optimizer_arch, cfg.num_classes, cfg.optimizer_repeats, device=device, sync=sync,
                             progress=tick, compiled=cfg.optimizer_compiled)
        adaptive = None if not cfg.adaptive_repeats else adaptive_steps(
            cfg.optimizer_arch, cfg.num_classes, cfg.adaptive_repeats, device=device, sync=sync, progress=tick)
        trains = [training_steps(s.arch, s.image_size, s.batch_size, s.repeats, s.methods, cfg.num_classes,
                                 device=device, sync=sync, progress=tick) for s in cfg.train]
        mems = [] if device.type != "cpu" else [
            peak_memory(s.arch, s.image_size, s.batch_size, steps=cfg.memory_steps, num_classes=cfg.num_classes,
                        threads=torch.get_num_threads(), repeats=cfg.memory_repeats, progress=tick)
            for s in cfg.train]
    finally:
        if bar is not None:
            bar.close()
    env["load_average_1min_end"] = load_average()
    vs_plain = [t["step_ratio_repopt_vs_plain"] for t in trains if "step_ratio_repopt_vs_plain" in t]
    vs_repvgg = [t["throughput_ratio_repopt_vs_repvgg"] for t in trains if "throughput_ratio_repopt_vs_repvgg" in t]
    memory = [m["peak_ratio_repopt_vs_repvgg"] for m in mems]
    result = {
        "optimizer_step_ratio": opt["ratio"],
        "optimizer_extra_state_fraction": opt["extra_state_fraction"],
        "train_step_ratio_vs_plain": max(vs_plain) if vs_plain else None,
        "train_throughput_ratio_vs_repvgg": min(vs_repvgg) if vs_repvgg else None,
        "peak_memory_ratio_vs_repvgg": max(memory) if memory else None,
        "targets": {k: f"{c} {b}" for k, (c, b) in TARGETS.items()},
        "environment": env,
        "config": asdict(cfg),
        "details": {"optimizer": opt, "adaptive_optimizers": adaptive, "training": trains, "memory": mems},
    }
    result["met"] = {k: met(k, result[k]) for k in KEYS}
    return result


def met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    comparison, bound = TARGETS[key]
    return value <= bound if comparison == "<=" else value >= bound
