"""The branch algebra of gradient re-parameterization (see docs/math.md).

A *target* conv (kernel W', shape (C_out, C_in/groups, kh, kw), no bias) stands for an imaginary CSLA block: a sum of
conv branches, each a smaller centred kernel W_b times a constant per-output-channel scale alpha_b, plus an optional
trainable identity scale a. Everything repopt computes for one target conv lives here as pure tensor maths:

    W'  = sum_b alpha_b E_b(W_b) + D(a)                                 equivalent kernel / rule of initialization (1)
    M   = sum_b alpha_b^2 E_b(1) + D(1)                                 SGD gradient multiplier (3)
    U   = sum_b E_b(alpha_b^2 / (|alpha_b| sqrt(v) + eps)) + D(1/(sqrt(v) + eps))     exact AdamW factor (4)
    L   = sum_b |alpha_b| E_b(1) + D(1)                                 exact Lion multiplier (5)

The per-channel scale vectors are the source of truth; every full-size tensor is derived from them on demand, and the
multipliers are applied through a small (C_out, kh, kw) tap table repeated over the input channels plus a correction
on the diagonal centre taps, so no state the size of the weight is ever kept (`multiply_rows`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

IDENTITY = "identity"
_BRANCH_NAME = re.compile(r"^(\d+)x(\d+)(?:_[A-Za-z0-9]+)?$")


class BranchError(ValueError):
    """A branch description that cannot stand for the given target conv; `.layer` and `.reason` hold the parts."""

    def __init__(self, message: str, layer: str | None = None):
        super().__init__(f"{layer}: {message}" if layer else message)
        self.layer, self.reason = layer, message


def branch_kernel_size(name: str) -> tuple[int, int] | None:
    """'3x3' -> (3, 3); '1x3' -> (1, 3); '3x3_2' (a second 3x3 branch) -> (3, 3); 'identity' -> None."""
    if name == IDENTITY:
        return None
    m = _BRANCH_NAME.match(name)
    if m is None:
        raise BranchError(f"unknown branch name {name!r}: use 'KHxKW' (e.g. '3x3', '1x1', '1x3'), "
                          f"'KHxKW_tag' for a second branch of the same size, or 'identity'")
    return int(m.group(1)), int(m.group(2))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ConvGeometry:
    """What the algebra needs to know about a target conv."""

    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | None = None  # None: "same" for the kernel
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvGeometry":
        pad = conv.padding
        if isinstance(pad, str):
            pad = None if pad == "same" else (0, 0)
        return cls(conv.out_channels, conv.in_channels, _pair(conv.kernel_size), _pair(conv.stride),
                   None if pad is None else _pair(pad), _pair(conv.dilation), conv.groups)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def centre(self) -> tuple[int, int]:
        return self.kernel_size[0] // 2, self.kernel_size[1] // 2

    def identity_reason(self) -> str | None:
        """Why an identity branch is impossible here, or None when it is possible."""
        kh, kw = self.kernel_size
        if self.in_channels != self.out_channels:
            return f"in_channels {self.in_channels} != out_channels {self.out_channels}"
        if self.stride != (1, 1):
            return f"stride {self.stride} is not 1"
        if kh % 2 == 0 or kw % 2 == 0:
            return f"kernel {kh}x{kw} has no centre tap"
        same = (self.dilation[0] * (kh - 1) // 2, self.dilation[1] * (kw - 1) // 2)
        if self.padding is not None and self.padding != same:
            return f"padding {self.padding} does not keep the spatial size (needs {same})"
        return None


def diagonal_taps(t: Tensor, geometry: ConvGeometry) -> Tensor:
    """A view of the entries [c, c within its group, centre] of a weight-shaped tensor, shaped (groups, C_out/groups).

    These are the taps where D(.) lives: the identity branch reads and writes only them.
    """
    cy, cx = geometry.centre
    per_group = geometry.out_channels // geometry.groups
    return t[:, :, cy, cx].unflatten(0, (geometry.groups, per_group)).diagonal(dim1=1, dim2=2)


def _support(geometry: ConvGeometry, size: tuple[int, int]) -> tuple[slice, slice]:
    """The slice of the k x k window that a centred (kh_b, kw_b) branch covers: E_b embeds into it, P_b crops it."""
    (kh, kw), (bh, bw) = geometry.kernel_size, size
    oy, ox = (kh - bh) // 2, (kw - bw) // 2
    return slice(oy, oy + bh), slice(ox, ox + bw)


def default_conv_init_(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PyTorch's default Conv2d weight init (kaiming uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return weight.uniform_(-bound, bound, generator=generator)


class BranchSet:
    """The imaginary CSLA block of one target conv: constant scales per conv branch, and whether an identity exists.

    `scales` maps a branch name ('3x3', '1x1', '1x3', '3x3_2', ...) to a vector of C_out constants, and optionally
    'identity' to the searched identity scale (used only by the rule of initialization; the identity branch itself is
    trainable, so it adds D(1) to the multipliers whatever its scale).
    """

    def __init__(self, geometry: ConvGeometry, scales: Mapping[str, Tensor], name: str = "conv"):
        self.geometry, self.name = geometry, name
        self.conv_scales: dict[str, Tensor] = {}
        self.identity_scale: Tensor | None = None
        kh, kw = geometry.kernel_size
        for branch, value in scales.items():
            vec = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
            if vec.numel() == 1 and geometry.out_channels != 1:
                vec = vec.expand(geometry.out_channels).clone()
            if vec.numel() != geometry.out_channels:
                raise BranchError(f"branch {branch!r} has {vec.numel()} scales but the conv has "
                                  f"{geometry.out_channels} output channels", name)
            if not torch.isfinite(vec).all():
                raise BranchError(f"branch {branch!r} holds NaN or inf scales", name)
            try:
                size = branch_kernel_size(branch)
            except BranchError as e:
                raise BranchError(e.reason, name) from None
            if size is None:
                reason = geometry.identity_reason()
                if reason is not None:
                    raise BranchError(f"an identity branch is impossible here ({reason})", name)
                self.identity_scale = vec
                continue
            bh, bw = size
            if bh > kh or bw > kw or (kh - bh) % 2 or (kw - bw) % 2:
                raise BranchError(f"branch {branch!r} cannot be centred in the {kh}x{kw} kernel", name)
            self.conv_scales[branch] = vec
        if not self.conv_scales and self.identity_scale is None:
            raise BranchError("no branches given", name)
        self._tables: dict[tuple, Tensor] = {}
        self._repeat: int | None = None

    # ---- description -------------------------------------------------------------------------------------------
    @property
    def has_identity(self) -> bool:
        return self.identity_scale is not None

    @property
    def branch_names(self) -> list[str]:
        return list(self.conv_scales) + ([IDENTITY] if self.has_identity else [])

    def scales(self) -> dict[str, Tensor]:
        out = dict(self.conv_scales)
        if self.identity_scale is not None:
            out[IDENTITY] = self.identity_scale
        return out

    def same_as(self, other: "BranchSet") -> bool:
        a, b = self.scales(), other.scales()
        return self.geometry == other.geometry and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def __repr__(self) -> str:
        return f"BranchSet({self.name}, {self.geometry.weight_shape}, branches={self.branch_names})"

    # ---- the multipliers ---------------------------------------------------------------------------------------
    def _cached(self, name, device, dtype, build) -> Tensor:
        """A per-channel table built once in float64 by `build()`, kept per (name, device, dtype)."""
        key = (name, torch.device(device) if device is not None else torch.device("cpu"), dtype)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = build().to(device=key[1], dtype=dtype).contiguous()
        return table

    def tap_table(self, power: int, device=None, dtype=torch.float64) -> Tensor:
        """(C_out, 1, kh, kw): sum_b |alpha_b|^power on each branch's support (power 2 gives alpha_b^2)."""
        def build():
            table = torch.zeros(self.geometry.out_channels, 1, *self.geometry.kernel_size, dtype=torch.float64)
            for branch, alpha in self.conv_scales.items():
                ys, xs = _support(self.geometry, branch_kernel_size(branch))
                table[:, :, ys, xs] += alpha.abs().pow(power).view(-1, 1, 1, 1)
            return table
        return self._cached(power, device, dtype, build)

    def support_tables(self, device=None, dtype=torch.float64) -> Tensor:
        """(conv branches, C_out, kh*kw): |alpha_b| on branch b's support, 0 elsewhere (what the native AdamW kernel
        evaluates U of (4) from)."""
        def build():
            table = torch.zeros(len(self.conv_scales), self.geometry.out_channels, *self.geometry.kernel_size,
                                dtype=torch.float64)
            for b, (branch, alpha) in enumerate(self.conv_scales.items()):
                ys, xs = _support(self.geometry, branch_kernel_size(branch))
                table[b, :, ys, xs] = alpha.abs().view(-1, 1, 1)
            return table.flatten(2)
        return self._cached("support", device, dtype, build)

    def _pattern_repeat(self) -> int:
        """How many input channels one multiply pattern spans (the largest divisor of C_in/groups up to 16).

        Broadcasting the (C_out, 1, kh, kw) table over the input channels leaves an inner loop of only kh*kw values;
        repeating the taps R times gives the multiply an inner loop of R*kh*kw contiguous values, which runs about
        as fast as a plain multiply (docs/benchmarks.md).
        """
        if self._repeat is None:
            per_group = self.geometry.in_channels // self.geometry.groups
            self._repeat = max(r for r in range(1, 17) if per_group % r == 0)
        return self._repeat

    @property
    def row_alignment(self) -> int:
        """Row blocks handed to `multiply_rows` must start and end on a multiple of this (a whole group of the
        identity's diagonal when the conv is grouped)."""
        g = self.geometry
        return g.out_channels // g.groups if self.has_identity and g.groups > 1 else 1

    def _diagonal_rows(self, t: Tensor, start: int) -> Tensor:
        """The diagonal centre taps of the rows start .. start + len(t) of a weight-shaped tensor, as a view."""
        g, n = self.geometry, t.shape[0]
        cy, cx = g.centre
        if g.groups == 1:
            return t[:, start:start + n, cy, cx].diagonal()
        per_group = g.out_channels // g.groups
        return t[:, :, cy, cx].unflatten(0, (n // per_group, per_group)).diagonal(dim1=1, dim2=2)

    def tap_pattern(self, power: int, device=None, dtype=torch.float64) -> Tensor:
        """(C_out, 1, R*kh*kw): the tap table repeated over R input channels (a new tensor, R/C_in of the weight)."""
        taps = self.tap_table(power, device, dtype)[:, 0].flatten(1)
        r = self._pattern_repeat()
        return taps.unsqueeze(1).expand(taps.shape[0], r, taps.shape[1]).reshape(taps.shape[0], 1, -1)

    def multiply_rows(self, rows: Tensor, start: int, out: Tensor, power: int = 2,
                      pattern: Tensor | None = None) -> Tensor:
        """out = (multiplier * G)[start : start + len(rows)], where `rows` = G[start : start + len(rows)].

        power 2 gives the SGD multiplier M of (3), power 1 Lion's L of (5). `out` may be any weight-row-shaped
        buffer (a slice of scratch memory), or `rows` itself to multiply in place. `pattern`: this set's
        `tap_pattern(power)` for the whole weight, when the caller multiplies many blocks of it.
        """
        n, per_group = rows.shape[:2]
        diagonal = None
        if self.has_identity:  # read before an in-place multiply overwrites it
            diagonal = self._diagonal_rows(rows, start)
            diagonal = diagonal.clone() if out.data_ptr() == rows.data_ptr() else diagonal
        r = self._pattern_repeat()
        if r > 1 and rows.is_contiguous() and out.is_contiguous():
            if pattern is None:
                pattern = self.tap_pattern(power, rows.device, rows.dtype)
            shape = (n, per_group // r, pattern.shape[-1])
            torch.mul(rows.view(shape), pattern[start:start + n], out=out.view(shape))
        else:
            torch.mul(rows, self.tap_table(power, rows.device, rows.dtype)[start:start + n], out=out)
        if diagonal is not None:
            self._diagonal_rows(out, start).add_(diagonal)
        return out

    def multiply(self, t: Tensor, power: int = 2) -> Tensor:
        """multiplier * t as a new tensor, in broadcasting ops that autograd follows (RepOptSGD(differentiable=True));
        the same products as `multiply_rows`."""
        out = t * self.tap_table(power, t.device, t.dtype)
        if self.has_identity:
            diagonal_taps(out, self.geometry).add_(diagonal_taps(t, self.geometry))
        return out

    def _apply(self, grad: Tensor, power: int) -> Tensor:
        return self.multiply_rows(grad, 0, torch.empty_like(grad), power)

    def nbytes(self) -> int:
        """Bytes this set keeps alive: its scale vectors and every cached per-channel table."""
        tensors = [*self.scales().values(), *self._tables.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def apply_sgd(self, grad: Tensor) -> Tensor:
        """M * G as a new tensor, M from (3)."""
        return self._apply(grad, 2)

    def apply_lion(self, update: Tensor) -> Tensor:
        """L * sign(c) as a new tensor, L from (5); `update` is sign(c)."""
        return self._apply(update, 1)

    def sgd_multiplier(self, dtype=torch.float64) -> Tensor:
        """The full-size M of (3)."""
        return self.apply_sgd(torch.ones(self.geometry.weight_shape, dtype=dtype))

    def lion_multiplier(self, dtype=torch.float64) -> Tensor:
        """The full-size L of (5)."""
        return self.apply_lion(torch.ones(self.geometry.weight_shape, dtype=dtype))

    def adamw_factor(self, denom_sqrt: Tensor, eps: float) -> Tensor:
        """U of (4), evaluated on sqrt(v_hat) (any weight-shaped tensor): replaces 1 / (sqrt(v_hat) + eps)."""
        u = torch.zeros_like(denom_sqrt)
        for branch, alpha in self.conv_scales.items():
            a = alpha.to(denom_sqrt.device, denom_sqrt.dtype).view(-1, 1, 1, 1)
            ys, xs = _support(self.geometry, branch_kernel_size(branch))
            u[:, :, ys, xs] += a.square() / (a.abs() * denom_sqrt[:, :, ys, xs] + eps)
        if self.has_identity:
            diagonal_taps(u, self.geometry).add_(diagonal_taps(denom_sqrt, self.geometry).add(eps).reciprocal())
        return u

    # ---- kernels -----------------------------------------------------------------------------------------------
    def branch_shape(self, branch: str) -> tuple[int, int, int, int]:
        c_out, c_in_g = self.geometry.weight_shape[:2]
        return (c_out, c_in_g, *branch_kernel_size(branch))

    def initial_branch_kernels(self, generator: torch.Generator | None = None,
                               dtype=torch.float32) -> dict[str, Tensor]:
        """Each conv branch's own default PyTorch initialization."""
        return {b: default_conv_init_(torch.empty(self.branch_shape(b), dtype=dtype), generator)
                for b in self.conv_scales}

    def equivalent_kernel(self, branch_kernels: Mapping[str, Tensor], identity: Tensor | None = None,
                          scales: Mapping[str, Tensor] | None = None) -> Tensor:
        """W' of (1) from branch kernels W_b, the identity scale a, and (by default) this set's constant scales."""
        scales = self.conv_scales if scales is None else scales
        ref = next(iter(branch_kernels.values())) if branch_kernels else identity
        w = torch.zeros(self.geometry.weight_shape, dtype=ref.dtype, device=ref.device)
        for branch, kernel in branch_kernels.items():
            ys, xs = _support(self.geometry, branch_kernel_size(branch))
            alpha = torch.as_tensor(scales[branch]).to(w.device, w.dtype).view(-1, 1, 1, 1)
            w[:, :, ys, xs] += alpha * kernel
        if identity is not None:
            diagonal_taps(w, self.geometry).add_(identity.to(w.dtype).view(self.geometry.groups, -1))
        return w

    def initial_kernel(self, identity_init: str | float = "searched", generator: torch.Generator | None = None,
                       dtype=torch.float32) -> Tensor:
        """The rule of initialization: W'(0) = sum_b alpha_b E_b(W_b(0)) + D(a(0)).

        identity_init: 'searched' uses the identity scale from the scales (the reference code's default), 'one' uses
        1 (the paper's formula), a number uses that value.
        """
        identity = None
        if self.has_identity:
            if identity_init == "searched":
                identity = self.identity_scale
            elif identity_init == "one":
                identity = torch.ones(self.geometry.out_channels, dtype=torch.float64)
            else:
                identity = torch.full((self.geometry.out_channels,), float(identity_init), dtype=torch.float64)
        kernels = self.initial_branch_kernels(generator, torch.float64)
        if not kernels:
            return self.equivalent_kernel({}, identity.to(torch.float64)).to(dtype)
        return self.equivalent_kernel(kernels, identity).to(dtype)


class FixedMultiplier:
    """A user-supplied full-size gradient multiplier (SGD, or Lion's L). Has no Adam form."""

    def __init__(self, mult: Tensor, name: str = "param"):
        self.mult, self.name = mult.detach(), name
        self._cache: dict[tuple, Tensor] = {}

    def _get(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.mult.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def apply_sgd(self, grad: Tensor) -> Tensor:
        return grad * self._get(grad)

    apply_lion = apply_sgd
    row_alignment = 1

    def multiply(self, t: Tensor, power: int = 2) -> Tensor:
        return t * self._get(t)

    def tap_pattern(self, power: int, device=None, dtype=None) -> None:
        return None  # multiply_rows reads the full tensor itself

    def multiply_rows(self, rows: Tensor, start: int, out: Tensor, power: int = 2, pattern=None) -> Tensor:
        """out = (mult * G)[start : start + len(rows)] (the same full tensor serves SGD and Lion)."""
        return torch.mul(rows, self._get(rows)[start:start + rows.shape[0]], out=out)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.mult, *self._cache.values()])

    def __repr__(self) -> str:
        return f"FixedMultiplier({self.name}, {tuple(self.mult.shape)})"
