"""The conv-BN-ReLU blocks of a RepOpt model, one per mode (the RepVGG baseline block is in repvgg_block.py).

Every block keeps its 3x3 conv at `<block>.conv` and its BatchNorm at `<block>.bn`, so a target model and its
hyper-search / CSLA twin have the same conv names and one scales file keys both.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .csla_conv import CSLAConv2d


class TargetBlock(nn.Module):
    """conv (3x3, no bias) -> BN -> ReLU: what RepOpt trains and what is deployed."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class CSLABlock(nn.Module):
    """CSLAConv2d {3x3, 1x1, identity where shapes allow} -> one BN -> ReLU.

    trainable_scales=True is the hyper-search (HS) block; False is the CSLA block (constant conv-branch scales,
    trainable identity), whose training by a stock optimizer RepOpt reproduces.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, scale_init: float = 1.0,
                 trainable_scales: bool = True, branches: Mapping[str, float] | None = None):
        super().__init__()
        branches = dict(branches) if branches is not None else {"3x3": scale_init, "1x1": scale_init}
        identity = in_channels == out_channels and stride == 1
        self.conv = CSLAConv2d(in_channels, out_channels, 3, stride, 1, branches=branches, identity=identity,
                               trainable_scales=trainable_scales)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))
