"""Kernel statistics of deployed models (paper Table 11) and the histogram figure."""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from repopt.quant import MissingExtraError, fold_batchnorm, kernel_stats, plot_kernel_histograms


def net(centre_boost: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 4, 1))  # a 1x1 conv has no surrounding taps: not reported
    with torch.no_grad():
        m[3].weight[:, :, 1, 1] += centre_boost  # what a fused identity / 1x1 branch does to a RepVGG kernel
        m[4].running_var.fill_(4.0)  # folding divides by sqrt(4 + eps): the stats must see that
    return m.eval()


def test_kernel_stats_values():
    m = net()
    rows = kernel_stats(m)
    assert [r["name"] for r in rows] == ["0", "3"]
    assert rows[1]["shape"] == [8, 8, 3, 3]
    w = fold_batchnorm(m)[3].weight.double()
    assert rows[1]["std"] == pytest.approx(w.std().item())
    assert rows[1]["std_centre"] == pytest.approx(w[:, :, 1, 1].std().item())
    surround = torch.cat([w[:, :, i, j].flatten() for i in range(3) for j in range(3) if (i, j) != (1, 1)])
    assert rows[1]["std_surround"] == pytest.approx(surround.std().item())
    assert rows[1]["max_abs"] == pytest.approx(w.abs().max().item())
    # deployed = BN folded: the raw kernel differs by the BN factor ~1/2 here
    assert kernel_stats(m, fold=False)[1]["std"] == pytest.approx(2 * rows[1]["std"], rel=1e-3)


def test_centre_inflation_shows():
    plain, inflated = kernel_stats(net())[1], kernel_stats(net(centre_boost=0.5))[1]
    assert inflated["std_surround"] == pytest.approx(plain["std_surround"])
    assert inflated["max_abs"] > plain["max_abs"]
    assert abs(inflated["std_centre"] - plain["std_centre"]) < 1e-9  # a constant shift: std unchanged...
    assert inflated["std"] > plain["std"]  # ...but the kernel as a whole is wider


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the `plot` extra: pip install 'repopt[plot]'")
    out = tmp_path / "hist.png"
    assert plot_kernel_histograms({"plain": net(), "inflated": net(0.5)}, out) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_kernel_histograms({"plain": net()}, out, layer="3")
    assert [p.name for p in tmp_path.iterdir()] == ["hist.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="no KxK conv named"):
        plot_kernel_histograms({"plain": net()}, out, layer="6")


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'repopt\[plot\]'"):
        plot_kernel_histograms({"plain": net()}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
