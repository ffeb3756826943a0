"""The structural re-parameterization baseline (RepVGG, Ding et al. CVPR 2021).

Training form: BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x) (identity only when shapes allow), then ReLU.
`reparameterize()` folds every BN into its branch and sums the branches into one 3x3 conv with bias at
`<block>.conv`; in eval mode the outputs agree to float rounding.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fuse_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(kernel, bias) of conv(x, kernel) followed by `bn` in eval mode, as one conv with bias."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    t = gamma / std
    return kernel * t.view(-1, 1, 1, 1), beta - bn.running_mean * t


class RepVGGBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv_3x3 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn_3x3 = nn.BatchNorm2d(out_channels)
        self.conv_1x1 = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(out_channels)
        self.bn_identity = nn.BatchNorm2d(out_channels) if in_channels == out_channels and stride == 1 else None
        self.relu = nn.ReLU()

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "conv")

    def forward(self, x: Tensor) -> Tensor:
        if self.reparameterized:
            return self.relu(self.conv(x))
        out = self.bn_3x3(self.conv_3x3(x)) + self.bn_1x1(self.conv_1x1(x))
        if self.bn_identity is not None:
            out = out + self.bn_identity(x)
        return self.relu(out)

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The 3x3 kernel and bias of the single conv that equals this block (BNs at their running statistics)."""
        k3, b3 = fuse_bn(self.conv_3x3.weight, self.bn_3x3)
        k1, b1 = fuse_bn(F.pad(self.conv_1x1.weight, [1, 1, 1, 1]), self.bn_1x1)
        kernel, bias = k3 + k1, b3 + b1
        if self.bn_identity is not None:
            eye = torch.zeros_like(k3)
            idx = torch.arange(self.out_channels, device=eye.device)
            eye[idx, idx, 1, 1] = 1.0
            ki, bi = fuse_bn(eye, self.bn_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace the branches by one 3x3 conv with bias (idempotent)."""
        if self.reparameterized:
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, self.stride, 1, bias=True,
                         device=kernel.device, dtype=kernel.dtype)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        for name in ("conv_3x3", "bn_3x3", "conv_1x1", "bn_1x1"):
            delattr(self, name)
        self.bn_identity = None
        self.conv = conv


def reparameterize_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Call `reparameterize()` on every block that has one (timm's convention); returns the model in eval mode.

    With inplace=False (default) the given model is left untouched and a fused copy is returned.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    return model.eval()
