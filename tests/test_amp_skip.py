"""A step that GradScaler skips (inf/nan gradients) is a no-op on every path of every RepOpt optimizer: a run with
skipped steps equals, bit for bit (parameters and optimizer state), the run of its real steps alone.

torch 2.13's own fused SGD fails this when the very first step overflows (its momentum buffers are left as
uninitialised memory); RepOptSGD must not inherit that, neither for its target convs nor for the parameters it hands to
torch's functional `sgd`.
"""
import pytest
import torch
from torch import nn

from repopt import RepOptAdamW, RepOptLion, RepOptSGD

from test_optim import batches, scales_for, small_net


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Uninitialised memory is often zeros, which hides the defect these tests look for (a CI machine once passed
    torch's own defective kernel that way). Every torch.empty_like made in a test is filled with NaN (1 for integer
    dtypes), so a result that reads memory nobody wrote is NaN, every time."""
    real = torch.empty_like

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        with torch.no_grad():
            out.fill_(float("nan") if out.is_floating_point() or out.is_complex() else 1)
        return out

    monkeypatch.setattr(torch, "empty_like", poisoned)

SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
# (label, class, kwargs): every path a target conv or a plain parameter can take, with and without fused
CONFIGS = [
    ("sgd native", RepOptSGD, dict(SGD)),
    ("sgd native fused", RepOptSGD, dict(SGD, fused=True)),
    ("sgd blocks", RepOptSGD, dict(SGD, native=False)),
    ("sgd blocks fused", RepOptSGD, dict(SGD, native=False, fused=True)),
    ("sgd blocks dampening fused", RepOptSGD, dict(lr=0.1, momentum=0.8, dampening=0.2, native=False, fused=True)),
    ("sgd one-row blocks fused", RepOptSGD, dict(SGD, native=False, fused=True, scratch_bytes=1)),
    ("sgd whole tensors", RepOptSGD, dict(SGD, native=False, scratch_bytes=0)),
    ("sgd whole tensors fused", RepOptSGD, dict(SGD, native=False, scratch_bytes=0, fused=True)),
    ("sgd foreach", RepOptSGD, dict(SGD, native=False, foreach=True)),
    ("sgd compiled", RepOptSGD, dict(SGD, compiled=True)),
    ("sgd compiled fused", RepOptSGD, dict(SGD, compiled=True, fused=True)),
    ("adamw native", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05)),
    ("adamw native fused", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, fused=True)),
    ("adamw eager", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, native=False)),
    ("adamw eager fused amsgrad", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, native=False, fused=True,
                                                    amsgrad=True)),
    ("adamw foreach", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, native=False, foreach=True)),
    ("lion native", RepOptLion, dict(lr=1e-3, weight_decay=0.1)),
    ("lion eager", RepOptLion, dict(lr=1e-3, weight_decay=0.1, native=False)),
    # the Triton kernels (GPU path; here under TRITON_INTERPRET=1, set by conftest.py)
    ("sgd triton", RepOptSGD, dict(SGD, triton=True)),
    ("sgd triton fused", RepOptSGD, dict(SGD, triton=True, fused=True)),
    ("adamw triton fused", RepOptAdamW, dict(lr=1e-2, weight_decay=0.05, triton=True, fused=True)),
    ("lion triton", RepOptLion, dict(lr=1e-3, weight_decay=0.1, triton=True)),
]
# which of the steps overflow: the first, a later one, the first two in a row
SKIPS = {"first": {0}, "later": {2}, "first two": {0, 1}}


def _run(cls, kwargs, skipped: set, real_steps: int = 4):
    net = small_net()
    opt = cls.from_scales(net, scales_for(net), generator=torch.Generator().manual_seed(0), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # powers of two: scaling is exact
    data = iter(batches(real_steps))
    for step in range(real_steps + len(skipped)):
        opt.zero_grad()
        if step in skipped:
            x, y = batches(1, seed=99)[0]
        else:
            x, y = next(data)
        scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
        if step in skipped:
            net[8].weight.grad[0, 0] = float("inf")  # the classifier overflows; the target convs look normal
        scaler.step(opt)
        scaler.update()
    return net, opt


def _state_tensors(opt):
    return [(i, k, v) for i, s in enumerate(opt.state.values()) for k, v in sorted(s.items())
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("label,cls,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_skipped_step_is_a_no_op(label, cls, kwargs, poisoned_empty):
    if kwargs.get("triton"):
        from repopt.optim import triton_kernels

        if triton_kernels.usable(torch.device("cpu")) is not None:
            pytest.skip(triton_kernels.usable(torch.device("cpu")))
    ref_net, ref_opt = _run(cls, kwargs, set())
    want = _state_tensors(ref_opt)
    for skips, skipped in SKIPS.items():
        net, opt = _run(cls, kwargs, skipped)
        for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
            assert torch.equal(p, q), (label, skips, name, (p - q).abs().max().item())
        got = _state_tensors(opt)
        assert [(i, k) for i, k, _ in got] == [(i, k) for i, k, _ in want]
        for (i, k, a), (_, _, b) in zip(got, want):
            assert torch.equal(a, b), (label, skips, i, k, (a - b).abs().max().item())


def test_torch_fused_sgd_still_has_the_defect_repopt_works_around(poisoned_empty):
    """If torch fixes its fused SGD, this fails: then the workaround in RepOptSGD can go (see _skips_a_first_step).
    With empty_like poisoned, the buffer the skipped first step leaves unwritten is NaN, so the defect shows every run."""
    p = nn.Parameter(torch.zeros(4096))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    p.grad = torch.ones(4096)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    p.grad = torch.ones(4096)
    opt.step()
    assert torch.isnan(p).all()


@pytest.mark.parametrize("native", [None, False])
def test_fused_sgd_with_a_parameter_whose_gradients_start_later(native):
    """torch's fused SGD raises on a mix of new and existing momentum buffers (a parameter that got no gradient on the
    first steps); RepOptSGD splits such a call and matches torch's single-tensor SGD."""
    def run(cls, **kw):
        net = small_net()
        opt = cls(net.parameters(), lr=0.1, momentum=0.9, **kw)
        for step, (x, y) in enumerate(batches(3)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if step == 0:
                net[8].weight.grad = None  # the classifier joins on the second step
            opt.step()
        return net

    want = run(torch.optim.SGD)
    got = run(RepOptSGD, fused=True, native=native)
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(got.parameters(), want.parameters()))
