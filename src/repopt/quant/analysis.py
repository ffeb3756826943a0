"""Statistics of deployed kernels (the paper's Table 11): why RepOpt quantizes well and fused RepVGG does not.

A fused RepVGG kernel is 3x3 + padded 1x1 + identity: its centre tap carries the sum of three branches and its
distribution is wide, so one int8 scale per tensor (or even per channel) wastes most levels on the centre. We report,
per KxK conv of the deployed (BN-folded / fused) model, the std over all taps, over the centre tap and over the
surrounding taps, and the largest magnitude.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ._extras import require
from .._io import atomic_write
from .fold import fold_batchnorm


def _square_odd_convs(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            if kh == kw and kh > 1 and kh % 2 == 1:
                yield name, m


def _taps(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(centre taps, surrounding taps) of a (C_out, C_in, K, K) kernel, both flattened."""
    k = weight.shape[-1]
    mask = torch.zeros(k, k, dtype=torch.bool, device=weight.device)
    mask[k // 2, k // 2] = True
    flat = weight.flatten(-2)
    return flat[..., mask.flatten()].flatten(), flat[..., ~mask.flatten()].flatten()


@torch.no_grad()
def kernel_stats(model: nn.Module, fold: bool = True) -> list[dict]:
    """Per square odd KxK conv (K > 1) of the deployed model, in module order:
    {"name", "shape", "std", "std_centre", "std_surround", "max_abs"}.

    With `fold=True` (default) conv->BN pairs are folded first on a copy, so a target model is measured as deployed;
    a RepVGG model must be fused by its own `reparameterize()` before it gets here.
    """
    deployed = fold_batchnorm(model) if fold else model
    rows = []
    for name, conv in _square_odd_convs(deployed):
        w = conv.weight.detach().double()
        centre, surround = _taps(w)
        rows.append({"name": name, "shape": list(w.shape), "std": w.std().item(),
                     "std_centre": centre.std().item(), "std_surround": surround.std().item(),
                     "max_abs": w.abs().max().item()})
    return rows


@torch.no_grad()
def plot_kernel_histograms(models: dict[str, nn.Module], path: str | os.PathLike, layer: str | None = None,
                           bins: int = 100, fold: bool = True) -> str:
    """Save a PNG with, per model, histograms of the centre taps and of the surrounding taps of its deployed KxK
    kernels: all such layers pooled, or only the conv named `layer`. Needs matplotlib (the `plot` extra)."""
    if not models:
        raise ValueError("plot_kernel_histograms needs at least one model")
    # The object-oriented Figure needs no pyplot and no GUI backend, and leaves the user's matplotlib state alone.
    figure = require("matplotlib.figure", "plot", "Plotting kernel histograms")
    fig = figure.Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    taps = {}  # label -> (centre values, surrounding values)
    for label, model in models.items():
        deployed = fold_batchnorm(model) if fold else model
        convs = [c for n, c in _square_odd_convs(deployed) if layer is None or n == layer]
        if not convs:
            raise ValueError(f"{label}: no KxK conv" + (f" named {layer!r}" if layer else ""))
        parts = [_taps(c.weight.detach().double().cpu()) for c in convs]
        taps[label] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    for i, ax in enumerate(axes):
        values = [v[i] for v in taps.values()]
        # Shared bin edges, so that the models' histograms compare bar for bar.
        lo, hi = min(v.min().item() for v in values), max(v.max().item() for v in values)
        edges = torch.linspace(lo, max(hi, lo + 1e-12), bins + 1)  # a constant kernel still gets a bin
        for label, v in zip(taps, values):
            ax.hist(v.numpy(), bins=edges.numpy(), histtype="step", density=True, log=True,
                    label=f"{label} (std {v.std().item():.4f})")
    where = f"layer {layer}" if layer else "all KxK layers"
    for ax, title in zip(axes, ("centre taps", "surrounding taps")):
        ax.set_title(f"{title}, {where}")
        ax.set_xlabel("kernel value")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("density (log)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    return os.fspath(path)
