"""The multi-tensor Triton kernels (repopt/optim/triton_kernels.py), run here on CPU tensors by Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py; on a GPU they compile): taken when asked, equal to the eager paths bit for bit
(the interpreter rounds each operation, fma included, as the eager path on AVX2/AVX-512 does; AdamW given a correctly
rounded sqrt, as in test_native.py), many weights in one launch, and a clear refusal where they cannot run. The
float64 proofs (tests/test_equivalence.py, cases "... triton") and the AMP skips (tests/test_amp_skip.py) run through
them too. Skipped where triton is not installed (pip install 'repopt[triton]')."""
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
