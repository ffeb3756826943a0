"""Property tests (hypothesis): random conv shapes, branch sets and scales either validate or raise BranchError, and
when they validate the multipliers obey MATH (3)-(5); random bytes and random dicts either load as Scales or raise
ScalesError, never another exception.
"""
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import repopt
from repopt.branches import BranchError, BranchSet, ConvGeometry, branch_kernel_size
from repopt.models import create

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BRANCHES = ["1x1", "1x3", "3x1", "3x3", "5x5", "3x3_2", "2x2", "identity", "conv"]
# zeros and negatives on purpose; no subnormals (their squares underflow to 0 while |alpha| does not)
SCALE = st.one_of(st.just(0.0), st.floats(-3, 3, allow_nan=False).filter(lambda v: v == 0 or abs(v) > 1e-6),
                  st.sampled_from([math.nan, math.inf]))


@st.composite
def branch_sets(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = c_in if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    kh = draw(st.sampled_from([1, 3, 5]))
    kw = kh if draw(st.booleans()) else draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2)]))
    padding = draw(st.sampled_from([None, (0, 0), (kh // 2, kw // 2)]))
    geometry = ConvGeometry(c_out, c_in, (kh, kw), stride, padding, groups=groups)
    names = draw(st.lists(st.sampled_from(BRANCHES), min_size=0, max_size=4, unique=True))
    length = st.sampled_from([c_out, c_out, c_out, 1, c_out + 1])
    scales = {n: torch.tensor(draw(st.lists(SCALE, min_size=k, max_size=k)), dtype=torch.float64)
              for n in names for k in [draw(length)]}
    return geometry, scales


def _multiplier_by_hand(bs: BranchSet, power: int) -> torch.Tensor:
    """sum_b |alpha_b|^power on each branch's centred support, + 1 on the diagonal centre taps (identity)."""
    g = bs.geometry
    m = torch.zeros(g.weight_shape, dtype=torch.float64)
    for name, alpha in bs.conv_scales.items():
        bh, bw = branch_kernel_size(name)
        oy, ox = (g.kernel_size[0] - bh) // 2, (g.kernel_size[1] - bw) // 2
        m[:, :, oy:oy + bh, ox:ox + bw] += alpha.abs().pow(power).view(-1, 1, 1, 1)
    if bs.has_identity:
        per_group = g.out_channels // g.groups
        for c in range(g.out_channels):
            m[c, c % per_group, g.centre[0], g.centre[1]] += 1
    return m


@FAST
@given(branch_sets(), st.integers(0, 2**31 - 1))
def test_branch_sets_validate_or_raise_branch_error(case, seed):
    geometry, scales = case
    try:
        bs = BranchSet(geometry, scales, name="layer")
    except BranchError as e:
        assert e.layer == "layer" and str(e).startswith("layer: ")
        return
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=gen)
    m = bs.sgd_multiplier()
    assert torch.allclose(m, _multiplier_by_hand(bs, 2), rtol=1e-12, atol=0)  # MATH (3)
    assert torch.allclose(bs.apply_sgd(grad), m * grad, rtol=1e-12, atol=1e-300)
    lion = bs.lion_multiplier()
    assert torch.allclose(lion, _multiplier_by_hand(bs, 1), rtol=1e-12, atol=0)  # MATH (5)
    denom = torch.rand(geometry.weight_shape, dtype=torch.float64, generator=gen) + 1e-3
    u = bs.adamw_factor(denom, 1e-8)  # MATH (4)
    assert torch.isfinite(u).all() and (u >= 0).all()
    assert torch.equal(u > 0, lion > 0)  # positive exactly where some branch (or the identity) reaches
    w = bs.initial_kernel(generator=gen)
    assert w.shape == geometry.weight_shape and torch.isfinite(w).all()


# ---- the scales loader -----------------------------------------------------------------------------------------
_DIR = Path(tempfile.mkdtemp(prefix="repopt-props-"))


def _load(data: bytes):
    path = _DIR / "scales.bin"
    path.write_bytes(data)
    try:
        scales = repopt.load_scales(path)
    except repopt.ScalesError:
        return None
    assert isinstance(scales, repopt.Scales)
    for entry in scales.values():
        assert all(t.ndim == 1 and t.is_floating_point() and torch.isfinite(t).all() for t in entry.values())
    return scales


def _safetensors_header(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


@FAST
@given(st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b),  # looks like a zip (torch.save)
    st.binary(max_size=300).map(lambda b: b"\x80\x02" + b),  # looks like a raw pickle
    st.builds(_safetensors_header,  # a well-formed header over random bytes
              st.dictionaries(st.text(max_size=12), st.fixed_dictionaries({
                  "dtype": st.sampled_from(["F32", "F64", "I64", "BOOL", "F16", "BF16", "U8", "XX"]),
                  "shape": st.lists(st.integers(0, 5), max_size=3),
                  "data_offsets": st.lists(st.integers(0, 64), min_size=2, max_size=2)}), max_size=3),
              st.binary(max_size=64)),
))
def test_random_bytes_load_or_raise_scales_error(data):
    _load(data)


TENSORS = st.builds(lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
                    st.lists(st.integers(0, 4), max_size=3), st.sampled_from([torch.float32, torch.float64,
                    torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]),
                    st.sampled_from([0.0, 1.5, -2.0, math.nan, math.inf]))
KEYS = st.one_of(st.text(max_size=20), st.sampled_from(
    ["stage0.scale_conv.weight", "module.stage1.0.scale_1x1.weight", "stage1.0.scale_identity.weight",
     "blocks.0.0.ghost1.cheap_operation.1.weight", "blocks.0.0.ghost1.fusion_scale.weight", "state_dict"]))
VALUES = st.recursive(st.one_of(TENSORS, st.integers(), st.text(max_size=5), st.none()),
                      lambda inner: st.dictionaries(KEYS, inner, max_size=3), max_leaves=6)


@FAST
@given(st.one_of(st.dictionaries(st.one_of(KEYS, st.integers()), VALUES, max_size=4), TENSORS, st.lists(TENSORS)))
def test_random_pth_contents_load_or_raise_scales_error(obj):
    path = _DIR / "obj.pth"
    torch.save(obj, path)
    _load(path.read_bytes())


@FAST
@given(st.dictionaries(st.text(max_size=10), TENSORS, max_size=4), st.sampled_from(["::", "_", ""]),
       st.sampled_from(["3x3", "1x1", "identity", "7x1", "bogus", ""]),
       st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2), st.booleans())
def test_random_safetensors_contents_load_or_raise_scales_error(tensors, sep, branch, meta, ours):
    path = _DIR / "obj.safetensors"
    metadata = {**meta, **({"format": "repopt-scales"} if ours else {})}
    save_file({f"{k}{sep}{branch}": v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    _load(path.read_bytes())


def test_the_loader_properties_reach_both_outcomes():
    scales = repopt.extract_scales(create("repopt_vgg_tiny", mode="hs"))
    path = repopt.save_scales(scales, _DIR / "ok.safetensors")
    assert _load(path.read_bytes()) is not None and _load(b"not scales") is None
    with pytest.raises(repopt.ScalesError):
        repopt.load_scales(_DIR / "missing.safetensors")
