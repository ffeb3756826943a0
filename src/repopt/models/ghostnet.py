"""RepOpt-GhostNet (the paper's depthwise example): a RepGhost-style GhostNet whose target convs are the depthwise
3x3 "cheap operations" of its ghost modules.

Ghost module:  x1 = ReLU?(BN(conv1x1(x)));  y = ReLU?(BN(cheap(x1)))  with cheap a depthwise 3x3 conv. Its imaginary
CSLA block is  s * dwconv3x3(x1) + a * x1  (scale s constant, "fusion" identity scale a trainable), so the released
`RepOptGhostNet_0_5x_scales.pth` keys `...ghostN.cheap_operation.1.weight` (s) and `...ghostN.fusion_scale.weight`
(a) bind to the conv `...ghostN.cheap_operation.0` as branches '3x3' and 'identity'.
Layer names follow the reference (`conv_stem`, `blocks.S.B.ghost1`, `conv_head`, `classifier`).
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .csla_conv import CSLAConv2d

MODES = ("target", "hs", "csla")

# (kernel of the stride-2 depthwise conv, expansion width, output width, SE ratio, stride), one list per block group.
REPGHOST_CFG = [
    [(3, 8, 16, 0, 1)],
    [(3, 24, 24, 0, 2)], [(3, 36, 24, 0, 1)],
    [(5, 36, 40, 0.25, 2)], [(5, 60, 40, 0.25, 1)],
    [(3, 120, 80, 0, 2)],
    [(3, 100, 80, 0, 1), (3, 120, 80, 0, 1), (3, 120, 80, 0, 1), (3, 240, 112, 0.25, 1), (3, 336, 112, 0.25, 1)],
    [(5, 336, 160, 0.25, 2)],
    [(5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1), (5, 480, 160, 0, 1), (5, 480, 160, 0.25, 1)],
]


def make_divisible(v: float, divisor: int = 4) -> int:
    """Round to a multiple of `divisor`, never more than 10% below v (MobileNet's channel rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, ratio: float = 0.25):
        super().__init__()
        reduced = make_divisible(channels * ratio, 4)
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * F.hardsigmoid(gate)


class ConvBnAct(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act1(self.bn1(self.conv(x)))


class GhostModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, relu: bool, mode: str, scale_init: float = 1.0):
        super().__init__()
        c = out_channels
        self.primary_conv = nn.Sequential(nn.Conv2d(in_channels, c, 1, bias=False), nn.BatchNorm2d(c),
                                          nn.ReLU() if relu else nn.Identity())
        if mode == "target":
            cheap = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        else:
            cheap = CSLAConv2d(c, c, 3, 1, 1, groups=c, branches={"3x3": scale_init}, identity=True,
                               trainable_scales=mode == "hs")
        self.cheap_operation = nn.Sequential(cheap)
        self.final_bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.final_bn(self.cheap_operation(self.primary_conv(x))))


class GhostBottleneck(nn.Module):
    def __init__(self, in_channels: int, mid: int, out_channels: int, kernel: int, stride: int, se_ratio: float,
                 mode: str, inits: tuple[float, float]):
        super().__init__()
        self.ghost1 = GhostModule(in_channels, mid, True, mode, inits[0])
        if stride > 1:
            self.conv_dw = nn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid, bias=False)
            self.bn_dw = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, se_ratio) if se_ratio else None
        self.ghost2 = GhostModule(mid, out_channels, False, mode, inits[1])
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, kernel, stride, (kernel - 1) // 2, groups=in_channels,
                          bias=False),
                nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ghost1(x)
        if hasattr(self, "conv_dw"):
            y = self.bn_dw(self.conv_dw(y))
        if self.se is not None:
            y = self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class RepOptGhostNet(nn.Module):
    def __init__(self, width: float = 0.5, mode: str = "target", num_classes: int = 1000, dropout: float = 0.2,
                 in_channels: int = 3, cfg=REPGHOST_CFG, arch: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} for RepOpt-GhostNet; choose one of {', '.join(MODES)}")
        self.mode, self.arch, self.num_classes, self.dropout = mode, arch, num_classes, dropout
        self._hs_init: dict[str, float] = {}
        c = make_divisible(16 * width)
        self.conv_stem = nn.Conv2d(in_channels, c, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU()
        groups, run = [], 0  # run: position of this bottleneck in a chain of shape-keeping ones (HS init)
        for g, group in enumerate(cfg):
            layers = []
            for b, (k, exp, out, se, s) in enumerate(group):
                out, mid = make_divisible(out * width), make_divisible(exp * width)
                run = run + 1 if s == 1 and c == out else 1
                # the l-th ghost module of the chain starts at sqrt(2 / (l + 1)), as in RepOpt-VGG
                inits = (math.sqrt(2 / (2 * run)), math.sqrt(2 / (2 * run + 1)))
                for n, v in zip(("ghost1", "ghost2"), inits):
                    self._hs_init[f"blocks.{g}.{b}.{n}.cheap_operation.0"] = v
                layers.append(GhostBottleneck(c, mid, out, k, s, se, mode, inits))
                c = out
            groups.append(nn.Sequential(*layers))
        head_in = make_divisible(cfg[-1][-1][1] * width * 2)
        groups.append(nn.Sequential(ConvBnAct(c, head_in)))
        self.blocks = nn.Sequential(*groups)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(head_in, 1280, 1, bias=True)
        self.act2 = nn.ReLU()
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act1(self.bn1(self.conv_stem(x))))
        x = self.act2(self.conv_head(self.global_pool(x))).flatten(1)
        return self.classifier(F.dropout(x, self.dropout, self.training))

    def target_conv_names(self) -> list[str]:
        """The depthwise cheap-operation convs (the only convs the released scales cover)."""
        return list(self._hs_init)

    def hs_scale_init(self, conv_name: str) -> float:
        return self._hs_init.get(conv_name, 1.0)
