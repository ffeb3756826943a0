"""CSLAConv2d: the explicit multi-branch conv that a target conv stands for.

    y = sum_b scale_b * conv(x, W_b) + identity * x

With trainable branch scales it is the Hyper-Search (HS) conv; with constant scales (buffers) it is the CSLA block of
the paper, whose training by a stock optimizer RepOpt reproduces exactly on a single conv. Put a BatchNorm after it.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..branches import IDENTITY, BranchSet, ConvGeometry, _pair, branch_kernel_size, default_conv_init_
from ..scales import ScalesError, as_scales


class CSLAConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=None, dilation=1,
                 groups: int = 1, branches: Iterable[str] | Mapping[str, float | Tensor] = ("3x3", "1x1"),
                 identity: bool | float | Tensor = False, trainable_scales: bool = True):
        super().__init__()
        k, d = _pair(kernel_size), _pair(dilation)
        if padding is None:
            padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        self.geometry = ConvGeometry(out_channels, in_channels, k, _pair(stride), _pair(padding), d, groups)
        self.trainable_scales = trainable_scales
        init = branches if isinstance(branches, Mapping) else {b: 1.0 for b in branches}
        self.convs = nn.ParameterDict()
        self._branch_names = list(init)
        spec = {b: torch.ones(out_channels) for b in init}
        if identity is not False:
            spec[IDENTITY] = torch.ones(out_channels)
        BranchSet(self.geometry, spec, name="CSLAConv2d")  # validates names, sizes and the identity up front
        for b, value in init.items():
            self.convs[b] = nn.Parameter(default_conv_init_(torch.empty(self.branch_shape(b))))
            vec = torch.as_tensor(value, dtype=torch.float32).expand(out_channels).clone()
            if trainable_scales:
                self.register_parameter(f"scale_{b}", nn.Parameter(vec))
            else:
                self.register_buffer(f"scale_{b}", vec)
        if identity is not False:
            start = 1.0 if identity is True else identity
            self.identity = nn.Parameter(torch.as_tensor(start, dtype=torch.float32).expand(out_channels).clone())
        else:
            self.register_parameter("identity", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, branches=("3x3", "1x1"), identity=None, trainable_scales=True):
        """A CSLA/HS conv with the geometry of `conv`; identity defaults to 'where the shapes allow it'."""
        g = ConvGeometry.of(conv)
        if identity is None:
            identity = g.identity_reason() is None
        return cls(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                   branches, identity, trainable_scales)

    def branch_shape(self, branch: str):
        c_out, c_in_g = self.geometry.weight_shape[:2]
        return (c_out, c_in_g, *branch_kernel_size(branch))

    @property
    def branch_names(self) -> list[str]:
        return self._branch_names

    def branch_scale(self, branch: str) -> Tensor:
        return getattr(self, f"scale_{branch}")

    def scales(self) -> dict[str, Tensor]:
        """The current per-channel scales, as a repopt scales entry (identity included when present)."""
        out = {b: self.branch_scale(b).detach().clone() for b in self._branch_names}
        if self.identity is not None:
            out[IDENTITY] = self.identity.detach().clone()
        return out

    def branch_set(self) -> BranchSet:
        return BranchSet(self.geometry, self.scales(), name="CSLAConv2d")

    def equivalent_kernel(self) -> Tensor:
        """W' of MATH (1): the single kernel whose conv equals this block's output."""
        bs = self.branch_set()
        scales = {b: self.branch_scale(b) for b in self._branch_names}
        return bs.equivalent_kernel(dict(self.convs), self.identity, scales)

    def forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        out = None
        for b in self._branch_names:
            bh, bw = branch_kernel_size(b)
            pad = (g.padding[0] - g.dilation[0] * (g.kernel_size[0] - bh) // 2,
                   g.padding[1] - g.dilation[1] * (g.kernel_size[1] - bw) // 2)
            xb = x
            if pad[0] < 0 or pad[1] < 0:  # a valid-padded target: the small branch sees a cropped input
                cy, cx = max(0, -pad[0]), max(0, -pad[1])
                xb = x[:, :, cy:x.shape[2] - cy, cx:x.shape[3] - cx]
                pad = (max(pad[0], 0), max(pad[1], 0))
            y = F.conv2d(xb, self.convs[b], None, g.stride, pad, g.dilation, g.groups)
            y = y * self.branch_scale(b).view(1, -1, 1, 1)
            out = y if out is None else out + y
        if self.identity is not None:
            y = x * self.identity.view(1, -1, 1, 1)
            out = y if out is None else out + y
        return out

    def to_target(self) -> nn.Conv2d:
        """The plain conv (no bias) with the equivalent kernel."""
        g = self.geometry
        kernel = self.equivalent_kernel().detach()
        conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                         bias=False, device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
        return conv

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
                f"groups={g.groups}, branches={self._branch_names}, identity={self.identity is not None}, "
                f"trainable_scales={self.trainable_scales}")


def hs_convs(model: nn.Module) -> dict[str, CSLAConv2d]:
    """Every CSLAConv2d of `model` by qualified name (the HS or CSLA convs, keyed like the target convs they stand for)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, CSLAConv2d)}


@torch.no_grad()
def set_scales(model: nn.Module, scales, strict: bool = True) -> None:
    """Write `scales` into the CSLAConv2d convs of an HS or CSLA model (the inverse of extract_scales).

    Every entry must name a CSLAConv2d with exactly the same branches; with strict=True every CSLAConv2d needs one.
    """
    scales = as_scales(scales)
    convs = hs_convs(model)
    for name, entry in scales.items():
        conv = convs.get(name)
        if conv is None:
            raise ScalesError(f"layer {name!r} of the scales is not a CSLAConv2d of the model")
        have = set(conv.branch_names) | ({IDENTITY} if conv.identity is not None else set())
        if set(entry) != have:
            raise ScalesError(f"layer {name!r}: the scales have branches {sorted(entry)} but the conv has "
                              f"{sorted(have)}")
        for branch, value in entry.items():
            dest = conv.identity if branch == IDENTITY else conv.branch_scale(branch)
            if value.numel() != dest.numel():
                raise ScalesError(f"layer {name!r}: branch {branch!r} has {value.numel()} scales but the conv has "
                                  f"{dest.numel()} output channels")
            dest.copy_(value.reshape(dest.shape))
    missing = [n for n in convs if n not in scales]
    if strict and missing:
        raise ScalesError(f"layer {missing[0]!r} of the model has no scales"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
