"""The multi-tensor Triton kernels (repopt/optim/triton_kernels.py), run here on CPU tensors by Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py; on a GPU they compile): taken when asked, equal to the eager paths bit for bit
(the interpreter rounds each operation, fma included, as the eager path on AVX2/AVX-512 does; AdamW given a correctly
rounded sqrt, as in test_native.py), many weights in one launch, and a clear refusal where they cannot run. The
float64 proofs (tests/test_equivalence.py, cases "... triton") and the AMP skips (tests/test_amp_skip.py) run through
them too. Skipped where triton is not installed (pip install 'repopt[triton]')."""
import math

import pytest
import torch
from torch import nn

from repopt import RepOptAdamW, RepOptLion, RepOptSGD
from repopt.optim import triton_kernels

from test_native import ADAPTIVE, FLAGS, SHAPES, TORCH_FUSES, _branch_set, _correctly_rounded_sqrt

pytestmark = pytest.mark.skipif(triton_kernels.usable(torch.device("cpu")) is not None,
                                reason=str(triton_kernels.usable(torch.device("cpu"))))


def _run_all(mults, flags, dtype, channels_last, path, optimizer, steps=2, seed=0):
    """Several weights in one optimizer (one launch per step on the Triton path)."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ws = [nn.Parameter(torch.randn(m.geometry.weight_shape, generator=g, dtype=dtype).contiguous(memory_format=fmt))
          for m in mults]
    kw = dict(native=False, triton=path == "triton")
    opt = optimizer(ws, grad_mults=dict(zip(ws, mults)), **{"lr": 0.1, **flags}, **kw)
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        opt.step()
    assert set(opt.path_counts) == {path if path == "triton" else ("blocks" if optimizer is RepOptSGD else "eager")}
    return [w.detach() for w in ws]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_step_matches_the_eager_path(monkeypatch, channels_last, dtype):
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES) if shape[0] < 70]  # 6 shapes, one launch
    for optimizer, flags in [(RepOptSGD, f) for f in FLAGS] + ADAPTIVE:
        with monkeypatch.context() as m:
            if optimizer is RepOptAdamW:
                m.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
            eager = _run_all(mults, flags, dtype, channels_last, "eager", optimizer)
        fast = _run_all(mults, flags, dtype, channels_last, "triton", optimizer)
        for a, b in zip(fast, eager):
            assert a.stride() == b.stride()
            if TORCH_FUSES:
                assert torch.equal(a, b), (optimizer.__name__, flags, (a != b).sum().item())
            else:
                assert torch.allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_wrong_table_fails_the_comparison(monkeypatch):
    """The comparison above can fail: the kernels read the tap table, and a doubled one changes the result."""
    mults = [_branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=2)]
    eager = _run_all(mults, FLAGS[0], torch.float64, False, "eager", RepOptSGD)
    table = type(mults[0]).tap_table
    monkeypatch.setattr(type(mults[0]), "tap_table", lambda self, *a, **k: table(self, *a, **k) * 2)
    broken = _run_all(mults, FLAGS[0], torch.float64, False, "triton", RepOptSGD)
    assert not torch.allclose(broken[0], eager[0], rtol=1e-6)


@pytest.mark.parametrize("cls", [RepOptSGD, RepOptAdamW, RepOptLion])
def test_triton_true_says_why_it_cannot_run(monkeypatch, cls):
    monkeypatch.delenv("TRITON_INTERPRET")
    w = nn.Parameter(torch.randn(4, 4, 3, 3))
    opt = cls([w], lr=0.1, grad_mults={w: _branch_set(4, 4, 3, 1, ("3x3", "identity"), seed=0)}, triton=True)
    w.grad = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"triton=True\): on CPU tensors the Triton kernels run only under "
                                           r"TRITON_INTERPRET=1"):
        opt.step()


def test_the_default_takes_triton_only_for_gpu_weights():
    w = nn.Parameter(torch.randn(4, 4, 3, 3))
    opt = RepOptSGD([w], lr=0.1, momentum=0.9, grad_mults={w: _branch_set(4, 4, 3, 1, ("3x3",), seed=0)})
    w.grad = torch.randn(4, 4, 3, 3)
    opt.step()
    assert "triton" not in opt.path_counts


def test_the_vectorised_variant_matches_the_eager_path():
    """Weights whose sizes are all multiples of 4 take the VEC=4 variant (aligned 16-byte accesses on a GPU); the
    6-shape launch above has a 63-element weight, so it takes VEC=1."""
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES[:2] + SHAPES[3:4])]
    assert triton_kernels.vector_width(torch.float32, [math.prod(m.geometry.weight_shape) for m in mults]) == 4
    for optimizer, flags in [(RepOptSGD, FLAGS[0]), (RepOptLion, ADAPTIVE[3][1])]:
        eager = _run_all(mults, flags, torch.float32, False, "eager", optimizer)
        fast = _run_all(mults, flags, torch.float32, False, "triton", optimizer)
        for a, b in zip(fast, eager):
            assert torch.equal(a, b) if TORCH_FUSES else torch.allclose(a, b, rtol=2e-5, atol=2e-6)


# ---- half precision ----------------------------------------------------------------------------------------------
def _to_bf16_truncating(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 as Triton's interpreter converts (the low 16 bits dropped; compiled Triton rounds to
    nearest even, which only a GPU run checks)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _half_run(mults, optimizer, flags, dtype, path, rounding=None, steps=3, seed=1):
    """Weights of `dtype` stepped by the Triton kernels (path "triton"), or the reference: the float32 eager path on
    float32 copies, with the weights and every state tensor rounded to `dtype` after each step (the kernels compute
    in float32 and round once, at the store)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [m.geometry.weight_shape for m in mults]
    start = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    work = torch.float32 if path == "eager" else dtype
    ws = [nn.Parameter(w.to(work)) for w in start]
    opt = optimizer(ws, grad_mults=dict(zip(ws, mults)), **{"lr": 0.1, **flags}, native=False,
                    triton=path == "triton")
    rnd = rounding or (lambda t: t.to(dtype))
    for step in range(steps):
        for w, grad in zip(ws, grads[step]):
            w.grad = grad.to(work)
        opt.step()
        if path == "eager":
            with torch.no_grad():
                for w in ws:
                    w.copy_(rnd(w).float())
                    for key, value in opt.state[w].items():
                        if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                            value.copy_(rnd(value).float())
    assert set(opt.path_counts) == {path if path == "triton" else ("blocks" if optimizer is RepOptSGD else "eager")}
    return [w.detach().to(dtype) if path == "eager" else w.detach() for w in ws]


HALF_CASES = [(RepOptSGD, FLAGS[0]), (RepOptSGD, FLAGS[2]), (RepOptSGD, FLAGS[4])] + ADAPTIVE[:2] + ADAPTIVE[3:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_the_float32_path_rounded_at_each_store(monkeypatch, dtype):
    """float16 weights: bit for bit the float32 eager path with weights and state rounded to float16 after each step
    (the interpreter rounds float16 as a GPU does). bfloat16: the same against a reference that truncates, as the
    interpreter's float32 -> bfloat16 conversion does (a GPU rounds to nearest: not checked here)."""
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES[:3] + SHAPES[5:6])]
    rounding = _to_bf16_truncating if dtype == torch.bfloat16 else None
    for optimizer, flags in HALF_CASES:
        with monkeypatch.context() as m:
            if optimizer is RepOptAdamW:
                m.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
            eager = _half_run(mults, optimizer, flags, dtype, "eager", rounding)
        fast = _half_run(mults, optimizer, flags, dtype, "triton")
        for a, b in zip(fast, eager):
            assert a.dtype == dtype
            if TORCH_FUSES:
                assert torch.equal(a, b), (optimizer.__name__, flags, (a != b).sum().item())
            else:
                assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)


def test_the_bfloat16_reference_can_fail():
    """Rounding bfloat16 to nearest (what compiled Triton does) is not what the interpreter does: the reference
    above would catch a kernel that rounded differently."""
    mults = [_branch_set(*SHAPES[0], seed=0)]
    fast = _half_run(mults, RepOptSGD, FLAGS[0], torch.bfloat16, "triton")
    nearest = _half_run(mults, RepOptSGD, FLAGS[0], torch.bfloat16, "eager", None)
    assert not torch.equal(fast[0], nearest[0])
