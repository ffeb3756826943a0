"""The branch algebra (MATH (1), (3), (4), (5)) against formulas written out by hand."""
import math

import pytest
import torch

from repopt import BranchError, BranchSet, ConvGeometry
from repopt.branches import branch_kernel_size, diagonal_taps

G = ConvGeometry(6, 6, (3, 3))


def vgg_scales(c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t, a = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(3))
    return s, t, a.abs() + 0.1


def test_sgd_multiplier_of_the_repopt_vgg_block():
    s, t, a = vgg_scales()
    m = BranchSet(G, {"3x3": s, "1x1": t, "identity": a}).sgd_multiplier()
    expected = (s ** 2).view(-1, 1, 1, 1).expand(6, 6, 3, 3).clone()
    expected[:, :, 1, 1] += (t ** 2).view(-1, 1)
    for c in range(6):
        expected[c, c, 1, 1] += 1.0  # +1, not a^2: the identity branch is trainable
    assert torch.equal(m, expected)


def test_lion_multiplier_uses_absolute_scales():
    s, t, a = vgg_scales()
    m = BranchSet(G, {"3x3": s, "1x1": t, "identity": a}).lion_multiplier()
    expected = s.abs().view(-1, 1, 1, 1).expand(6, 6, 3, 3).clone()
    expected[:, :, 1, 1] += t.abs().view(-1, 1)
    expected[range(6), range(6), 1, 1] += 1.0
    assert torch.equal(m, expected)


def test_adamw_factor_by_hand_and_its_eps_limit():
    s, t, a = vgg_scales()
    bs = BranchSet(G, {"3x3": s, "1x1": t, "identity": a})
    d = torch.rand(6, 6, 3, 3, dtype=torch.float64) + 0.1
    eps = 1e-3
    u = bs.adamw_factor(d, eps)
    for c, i, y, x in [(0, 0, 1, 1), (2, 3, 1, 1), (4, 1, 0, 2), (5, 5, 2, 2)]:
        want = s[c] ** 2 / (abs(s[c]) * d[c, i, y, x] + eps)
        if (y, x) == (1, 1):
            want += t[c] ** 2 / (abs(t[c]) * d[c, i, y, x] + eps)
            if c == i:
                want += 1 / (d[c, i, y, x] + eps)
        assert math.isclose(float(u[c, i, y, x]), float(want), rel_tol=1e-14)
    # eps -> 0: U -> (sum |alpha_b| + identity) / sqrt(v_hat)
    limit = bs.lion_multiplier() / d
    assert torch.allclose(bs.adamw_factor(d, 0.0), limit, rtol=1e-14, atol=0)


def test_zero_scale_branch_contributes_nothing_to_adam():
    bs = BranchSet(G, {"3x3": torch.ones(6), "1x1": torch.zeros(6)})
    d = torch.rand(6, 6, 3, 3, dtype=torch.float64) + 0.1
    assert torch.equal(bs.adamw_factor(d, 1e-8), BranchSet(G, {"3x3": torch.ones(6)}).adamw_factor(d, 1e-8))


def test_grouped_diagonal_taps():
    g = ConvGeometry(8, 8, (3, 3), groups=2)
    w = torch.zeros(8, 4, 3, 3)
    diagonal_taps(w, g).add_(torch.arange(1.0, 9.0).view(2, 4))
    for c in range(8):
        assert w[c, c % 4, 1, 1] == c + 1
    assert w.count_nonzero() == 8


def test_rule_of_initialization_is_the_branch_sum():
    s, t, a = vgg_scales()
    bs = BranchSet(G, {"3x3": s, "1x1": t, "identity": a})
    w = bs.initial_kernel(generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kernels = bs.initial_branch_kernels(torch.Generator().manual_seed(3), torch.float64)
    expected = s.view(-1, 1, 1, 1) * kernels["3x3"]
    expected[:, :, 1, 1] += t.view(-1, 1) * kernels["1x1"][:, :, 0, 0]
    expected[range(6), range(6), 1, 1] += a
    assert torch.equal(w, expected)
    # branch kernels follow PyTorch's default conv init bound 1/sqrt(fan_in)
    assert kernels["3x3"].abs().max() <= 1 / math.sqrt(6 * 9)
    assert kernels["1x1"].abs().max() <= 1 / math.sqrt(6)
    one = bs.initial_kernel("one", torch.Generator().manual_seed(3), torch.float64)
    assert torch.allclose(one - w, torch.diag_embed(1 - a).view(6, 6)[:, :, None, None] * _centre(), rtol=0, atol=1e-15)


def _centre():
    c = torch.zeros(3, 3, dtype=torch.float64)
    c[1, 1] = 1
    return c


@pytest.mark.parametrize("name,size", [("3x3", (3, 3)), ("1x3", (1, 3)), ("3x3_2", (3, 3)), ("5x5", (5, 5)),
                                       ("identity", None)])
def test_branch_names(name, size):
    assert branch_kernel_size(name) == size


@pytest.mark.parametrize("geometry,scales,message", [
    (ConvGeometry(6, 6, (3, 3), stride=(2, 2)), {"3x3": torch.ones(6), "identity": torch.ones(6)}, "stride"),
    (ConvGeometry(6, 4, (3, 3)), {"3x3": torch.ones(6), "identity": torch.ones(6)}, "in_channels"),
    (G, {"3x3": torch.ones(5)}, "5 scales"),
    (G, {"5x5": torch.ones(6)}, "cannot be centred"),
    (G, {"2x2": torch.ones(6)}, "cannot be centred"),
    (G, {"3x3": torch.tensor([1, 2, float("nan"), 4, 5, 6])}, "NaN"),
    (G, {"conv": torch.ones(6)}, "unknown branch name"),
])
def test_bad_branch_sets_name_the_layer(geometry, scales, message):
    with pytest.raises(BranchError, match=message) as e:
        BranchSet(geometry, scales, name="stage1.0.conv")
    assert "stage1.0.conv" in str(e.value)


@pytest.mark.parametrize("geometry", [ConvGeometry(8, 8, (3, 3)), ConvGeometry(8, 8, (3, 3), groups=2),
                                      ConvGeometry(6, 6, (3, 3), groups=6), ConvGeometry(6, 5, (3, 3))])
def test_multiply_rows_on_any_block_equals_the_full_multiplier(geometry):
    """The block, pattern, table and in-place paths of multiply_rows give the same M * G (and L * G), bit for bit."""
    gen = torch.Generator().manual_seed(0)
    c = geometry.out_channels
    scales = {"3x3": torch.randn(c, generator=gen), "1x1": torch.randn(c, generator=gen)}
    if geometry.identity_reason() is None:
        scales["identity"] = torch.rand(c, generator=gen)
    bs = BranchSet(geometry, scales)
    grad = torch.randn(geometry.weight_shape, generator=gen, dtype=torch.float64)
    for power, full in ((2, bs.sgd_multiplier()), (1, bs.lion_multiplier())):
        expected = bs.multiply_rows(grad, 0, torch.empty_like(grad), power)
        assert torch.allclose(expected, full * grad, rtol=1e-15, atol=0)  # the diagonal's +G is a second rounding
        step = bs.row_alignment
        blocks = torch.empty_like(grad)
        for start in range(0, c, step):  # one aligned block at a time, into a separate buffer
            bs.multiply_rows(grad[start:start + step], start, blocks[start:start + step], power)
        assert torch.equal(blocks, expected)
        in_place = grad.clone()
        bs.multiply_rows(in_place, 0, in_place, power)
        assert torch.equal(in_place, expected)
        channels_last = grad.contiguous(memory_format=torch.channels_last)
        out = torch.empty_like(channels_last)
        assert torch.equal(bs.multiply_rows(channels_last, 0, out, power), expected)
