"""RepOpt-VGG: a plain VGG-style net (five stages of 3x3 conv-BN-ReLU blocks, global pool, one Linear).

Architectures are data (`VGGConfig`); the block of each mode comes from `make_block`. Module names follow the
reference implementation (`stage0` = stem block, `stage1.0` ... `stage4.k`, head `linear`), so the released
hyper-search scales (`stageK.i.scale_conv.weight` ...) map one-to-one onto `stageK.i.conv`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from torch import Tensor, nn

from .blocks import CSLABlock, TargetBlock
from .repvgg_block import RepVGGBlock

MODES = ("target", "hs", "csla", "repvgg")


@dataclass(frozen=True)
class VGGConfig:
    """stem width, then (width, number of blocks) per stage 1..4, and the strides of stage0..stage4."""

    stem: int
    widths: tuple[int, int, int, int]
    blocks: tuple[int, int, int, int]
    strides: tuple[int, int, int, int, int] = (2, 2, 2, 2, 2)

    @classmethod
    def from_multipliers(cls, blocks, multipliers, strides=(2, 2, 2, 2, 2)) -> VGGConfig:
        # RepVGG's rule: base widths 64, 128, 256, 512 times the stage multiplier; the stem never exceeds 64.
        widths = tuple(int(base * m) for base, m in zip((64, 128, 256, 512), multipliers))
        return cls(min(64, int(64 * multipliers[0])), widths, tuple(blocks), tuple(strides))


_A, _B, _L = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)  # blocks of stages 1..4 (22, 28, 48 layers with the stem)

# the names written out, so that a search for one finds its definition (models/registry.py: their metadata)
CONFIGS: dict[str, VGGConfig] = {
    "repopt_vgg_a0": VGGConfig.from_multipliers(_A, (0.75, 0.75, 0.75, 2.5)),
    "repopt_vgg_a1": VGGConfig.from_multipliers(_A, (1, 1, 1, 2.5)),
    "repopt_vgg_a2": VGGConfig.from_multipliers(_A, (1.5, 1.5, 1.5, 2.75)),
    "repopt_vgg_b0": VGGConfig.from_multipliers(_B, (1, 1, 1, 2.5)),
    "repopt_vgg_b1": VGGConfig.from_multipliers(_B, (2, 2, 2, 4)),
    "repopt_vgg_b2": VGGConfig.from_multipliers(_B, (2.5, 2.5, 2.5, 5)),
    "repopt_vgg_b3": VGGConfig.from_multipliers(_B, (3, 3, 3, 5)),
    "repopt_vgg_l1": VGGConfig.from_multipliers(_L, (2, 2, 2, 4)),    # B1's widths
    "repopt_vgg_l2": VGGConfig.from_multipliers(_L, (2.5, 2.5, 2.5, 5)),  # B2's widths
    # CPU presets for 32x32 images: three stride-2 layers (32 -> 4 at stage4), stage1 keeps the stem's width so its
    # first block has an identity branch too.
    "repopt_vgg_tiny": VGGConfig(16, (16, 32, 64, 128), (1, 2, 2, 1), (1, 1, 2, 2, 2)),
    "repopt_vgg_small": VGGConfig(32, (32, 64, 128, 256), (2, 3, 3, 1), (1, 1, 2, 2, 2)),
    # CPU preset for depth (not in the paper): the L family's 48 layers at half of B0's widths (multipliers 0.5, 0.5,
    # 0.5, 2.5), about the compute of A0 (22 layers) at 28x28; the deepest net of docs/results.md
    "repopt_vgg_l0": VGGConfig.from_multipliers(_L, (0.5, 0.5, 0.5, 2.5)),
}


def hs_scale_init(block_index: int) -> float:
    """Initial conv-branch scale of the HS block at `block_index` within its stage (the reference's rule).

    1 for the first block of a stage (and the stem); sqrt(2 / l) for block l = 1, 2, ...: the identity paths add up
    along a stage, so the conv branches start smaller as the stage gets deeper.
    """
    return 1.0 if block_index == 0 else math.sqrt(2.0 / block_index)


def make_block(mode: str, in_channels: int, out_channels: int, stride: int, block_index: int = 0) -> nn.Module:
    if mode == "target":
        return TargetBlock(in_channels, out_channels, stride)
    if mode == "repvgg":
        return RepVGGBlock(in_channels, out_channels, stride)
    if mode in ("hs", "csla"):
        return CSLABlock(in_channels, out_channels, stride, hs_scale_init(block_index),
                         trainable_scales=mode == "hs")
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")


class RepOptVGG(nn.Module):
    def __init__(self, config: VGGConfig, mode: str = "target", num_classes: int = 1000, in_channels: int = 3,
                 strides=None, arch: str | None = None):
        super().__init__()
        if strides is not None:
            strides = tuple(int(s) for s in strides)
            if len(strides) != 5:
                raise ValueError(f"strides must give 5 values (stage0..stage4), got {strides}")
            config = replace(config, strides=strides)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.config, self.mode, self.arch, self.num_classes = config, mode, arch, num_classes
        self.stage0 = make_block(mode, in_channels, config.stem, config.strides[0])
        channels = config.stem
        for k, (width, n) in enumerate(zip(config.widths, config.blocks), start=1):
            stage = []
            for i in range(n):
                stage.append(make_block(mode, channels, width, config.strides[k] if i == 0 else 1, i))
                channels = width
            setattr(self, f"stage{k}", nn.Sequential(*stage))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for k in range(5):
            x = getattr(self, f"stage{k}")(x)
        return self.linear(self.gap(x).flatten(1))

    def target_conv_names(self) -> list[str]:
        """The convs RepOpt trains with branch scales: every block's `conv`."""
        names = ["stage0.conv"]
        for k in range(1, 5):
            names += [f"stage{k}.{i}.conv" for i in range(len(getattr(self, f"stage{k}")))]
        return names

    def hs_scale_init(self, conv_name: str) -> float:
        """The HS init for the conv-branch scales of `conv_name` (used by repopt.to_hyper_search)."""
        parts = conv_name.split(".")
        if len(parts) == 3 and parts[0] in ("stage1", "stage2", "stage3", "stage4") and parts[1].isdigit():
            return hs_scale_init(int(parts[1]))
        return 1.0  # the stem, or a conv outside the block structure
