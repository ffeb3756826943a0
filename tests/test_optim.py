"""RepOpt optimizers follow torch's conventions: plain params are bit-identical to torch, checkpoints, schedulers,
dtype moves, AMP, torch.compile, grad_mults by hand."""
import io

import pytest
import torch
from torch import nn

import repopt
from repopt import RepOptAdamW, RepOptLion, RepOptSGD, ReinitError


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def scales_for(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"0": {"3x3": torch.randn(8, generator=g), "1x1": torch.randn(8, generator=g)},
            "3": {"3x3": torch.randn(8, generator=g), "1x1": torch.randn(8, generator=g),
                  "identity": torch.rand(8, generator=g) + 0.5}}


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def train(net, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True}])
def test_sgd_without_multipliers_is_bit_identical_to_torch(flags):
    a, b = small_net(), small_net()
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, **flags)
    train(a, torch.optim.SGD(a.parameters(), **kw), batches())
    train(b, RepOptSGD(b.parameters(), **kw), batches())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True}, {"amsgrad": True}])
def test_adamw_without_multipliers_is_bit_identical_to_torch(flags):
    a, b = small_net(), small_net()
    kw = dict(lr=1e-2, weight_decay=0.05, **flags)
    train(a, torch.optim.AdamW(a.parameters(), **kw), batches())
    train(b, RepOptAdamW(b.parameters(), **kw), batches())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lion_without_multipliers_is_the_published_rule():
    net = small_net()
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    moments = {n: torch.zeros_like(p) for n, p in ref.items()}
    opt = RepOptLion(net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        for n, p in net.named_parameters():  # Chen et al. 2023, Algorithm 1, written out
            c = 0.9 * moments[n] + 0.1 * p.grad
            ref[n] = ref[n] * (1 - 1e-3 * 0.1) - 1e-3 * torch.sign(c)
            moments[n] = 0.99 * moments[n] + 0.01 * p.grad
        opt.step()
    for n, p in net.named_parameters():
        assert torch.allclose(p, ref[n], atol=1e-6), n


@pytest.mark.parametrize("cls", [RepOptSGD, RepOptAdamW, RepOptLion])
def test_p_grad_is_left_untouched(cls):
    net = small_net()
    opt = cls.from_scales(net, scales_for(net), lr=1e-3)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    before = net[0].weight.grad.clone()
    opt.step()
    assert torch.equal(net[0].weight.grad, before)


@pytest.mark.parametrize("cls,kw", [(RepOptSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                    (RepOptAdamW, dict(lr=1e-2)), (RepOptLion, dict(lr=1e-3))])
def test_state_dict_round_trip_continues_the_same_trajectory(cls, kw):
    data = batches(8)
    net = small_net()
    opt = cls.from_scales(net, scales_for(net), **kw)
    train(net, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    train(net, opt, data[4:])

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = small_net(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = cls.from_scales(resumed, scales_for(resumed), reinit=False, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[4:])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), resumed.parameters()))


def test_resuming_with_other_scales_is_refused():
    net = small_net()
    opt = RepOptSGD.from_scales(net, scales_for(net), lr=0.1, momentum=0.9)
    train(net, opt, batches(2))
    other = RepOptSGD.from_scales(net, scales_for(net, seed=5), reinit=False, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="'0'.*same multipliers|differs"):
        other.load_state_dict(opt.state_dict())


def test_multipliers_follow_a_dtype_move_and_lr_scheduler():
    net = small_net()
    opt = RepOptSGD.from_scales(net, scales_for(net), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
    train(net, opt, batches(2), sched)
    saved = opt.state_dict()
    net.double()
    opt.load_state_dict(saved)  # torch's way to move optimizer state: it casts to the params' dtype/device
    train(net, opt, [(x.double(), y) for x, y in batches(2, seed=4)], sched)
    assert opt.state[net[0].weight]["momentum_buffer"].dtype == torch.float64
    bs = opt.branch_sets[0]
    assert any(key[2] == torch.float64 for key in bs._tables)  # the multiplier was rebuilt in float64


def test_from_scales_applies_the_rule_once_and_refuses_trained_models():
    net = small_net()
    s = repopt.Scales(scales_for(net))
    RepOptSGD.from_scales(net, s, lr=0.1, generator=torch.Generator().manual_seed(7))
    # the rule of initialization drawn again from the same generator, conv by conv in the same order: W'(0) exactly
    g, no_identity = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for name, (_, bs) in s.bind(small_net()).items():
        expected = bs.initial_kernel(generator=g)
        assert torch.equal(net.get_submodule(name).weight, expected), name
        without = bs.initial_kernel(identity_init=0.0, generator=no_identity)
        identity = torch.zeros_like(expected)  # the searched scale, on the diagonal centre taps only
        if "identity" in s[name]:
            identity[:, :, 1, 1] = torch.diag(s[name]["identity"])
        torch.testing.assert_close(expected - without, identity)
    w = net[3].weight.detach().clone()
    opt = RepOptSGD.from_scales(net, s, lr=0.1, reinit=False)
    assert torch.equal(net[3].weight, w)
    train(net, opt, batches(2))
    with pytest.raises(ReinitError, match="looks trained"):
        RepOptSGD.from_scales(net, s, lr=0.1)
    RepOptSGD.from_scales(net, s, lr=0.1, force_reinit=True)


def test_from_scales_validates_names_and_lengths():
    net = small_net()
    s = scales_for(net)
    with pytest.raises(repopt.ScalesError, match="'7'"):
        RepOptSGD.from_scales(net, {**s, "7": {"3x3": torch.ones(8)}}, lr=0.1)
    with pytest.raises(repopt.ScalesError, match="'3'.*no scales"):
        RepOptSGD.from_scales(net, {"0": s["0"]}, lr=0.1)
    RepOptSGD.from_scales(net, {"0": s["0"]}, lr=0.1, strict=False)
    with pytest.raises(repopt.ScalesError, match="'0'.*4 scales"):
        RepOptSGD.from_scales(net, {**s, "0": {"3x3": torch.ones(4)}}, lr=0.1)


def test_weight_decay_groups_skip_1d_params():
    net = small_net()
    opt = RepOptSGD.from_scales(net, scales_for(net), lr=0.1, weight_decay=4e-5)
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert decayed == {"0.weight", "3.weight", "8.weight"}


def test_plain_tensor_multiplier_for_sgd_and_refused_for_adamw():
    net = small_net()
    m = torch.full_like(net[0].weight, 2.0)
    a, b = small_net(), small_net()
    train(a, RepOptSGD(a.parameters(), lr=0.1, grad_mults={a[0].weight: m}), batches(3))
    # a multiplier of 2 on one param equals SGD with that param's lr doubled (no momentum, no decay)
    groups = [{"params": [b[0].weight], "lr": 0.2}, {"params": [p for p in list(b.parameters())[1:]]}]
    train(b, torch.optim.SGD(groups, lr=0.1), batches(3))
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(TypeError, match="branch scales"):
        RepOptAdamW(net.parameters(), grad_mults={net[0].weight: m})


def test_grad_scaler_with_fused_sgd_matches_unscaled():
    a, b = small_net(), small_net()
    kw = dict(lr=0.1, momentum=0.9, fused=True)
    oa = RepOptSGD.from_scales(a, scales_for(a), generator=torch.Generator().manual_seed(0), **kw)
    ob = RepOptSGD.from_scales(b, scales_for(b), generator=torch.Generator().manual_seed(0), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in batches(3):
        oa.zero_grad()
        nn.functional.cross_entropy(a(x), y).backward()
        oa.step()
        ob.zero_grad()
        scaler.scale(nn.functional.cross_entropy(b(x), y)).backward()
        scaler.step(ob)
        scaler.update()
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_compiled_step_matches_eager():
    a, b = small_net(), small_net()
    oa = RepOptSGD.from_scales(a, scales_for(a), generator=torch.Generator().manual_seed(0), lr=0.1, momentum=0.9)
    ob = RepOptSGD.from_scales(b, scales_for(b), generator=torch.Generator().manual_seed(0), lr=0.1, momentum=0.9)
    compiled_step = torch.compile(ob.step)
    for x, y in batches(3):
        for net, opt, step in ((a, oa, oa.step), (b, ob, compiled_step)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            step()
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("flags", [dict(momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=True),
                                   dict(momentum=0.0, weight_decay=1e-3)])
def test_compiled_path_follows_the_eager_path(flags):
    """RepOptSGD(compiled=True) (one compiled kernel per weight) against the default block path, on flags the
    proofs do not cover (maximize makes the proof's training diverge, so rounding would be amplified there)."""
    a, b = small_net(), small_net()
    kw = dict(lr=0.1, generator=torch.Generator().manual_seed(0), **flags)
    oa = RepOptSGD.from_scales(a, scales_for(a), **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    ob = RepOptSGD.from_scales(b, scales_for(b), compiled=True, **kw)
    train(a, oa, batches(4))
    train(b, ob, batches(4))
    assert ob.compiled and set(ob.path_counts) == {"compiled"}  # every step compiled, none fell back
    assert all(torch.allclose(p, q, rtol=1e-5, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))


def test_differentiable_sgd_gives_the_gradients_torch_sgd_gives():
    """RepOptSGD(differentiable=True) keeps autograd on through the step, as torch.optim.SGD(differentiable=True) does:
    the gradient of a loss on the updated weight w.r.t. the starting weight, the gradient and lr equals torch's SGD fed
    the multiplied gradient M * G."""
    from repopt import BranchSet
    from repopt.branches import ConvGeometry

    g = torch.Generator().manual_seed(0)
    mult = BranchSet(ConvGeometry(4, 4, (3, 3)), {"3x3": torch.rand(4, generator=g) + 0.5,
                                                 "1x1": torch.rand(4, generator=g), "identity": torch.ones(4)})
    w0 = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    m = mult.sgd_multiplier(torch.float64)
    kw = dict(momentum=0.9, nesterov=True, weight_decay=1e-2, differentiable=True)

    def run(make, premultiply):
        p = w0.clone()  # a non-leaf, as in torch's own tests of differentiable optimizers
        opt = make(p)
        for grad in grads:
            p.grad = grad * m if premultiply else grad
            opt.step()
        return torch.autograd.grad(p.square().sum(), [w0, *grads, lr])

    want = run(lambda p: torch.optim.SGD([p], lr=lr, **kw), premultiply=True)
    got = run(lambda p: RepOptSGD([p], lr=lr, grad_mults={p: mult}, **kw), premultiply=False)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_adamw_refuses_what_its_target_step_cannot_honour(flag):
    net = small_net()
    with pytest.raises(ValueError, match=f"RepOptAdamW does not support {flag}=True"):
        RepOptAdamW.from_scales(net, scales_for(net), lr=1e-3, **{flag: True})


def test_the_compiled_path_does_not_recompile_for_each_setting():
    """torch.compile allows 8 variants of a function: settings, schedules and first steps are values to the compiled
    update, not constants, so that a process with many settings never falls off the compiled path."""
    import warnings

    from repopt.optim.compiled import compiled_update

    settings = [dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
                for m, d, n in ((0.9, 0, True), (0.9, 0, False), (0.8, 0.3, False)) for wd in (0, 1e-3)
                for mx in (False, True)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"RepOptSGD\(compiled=True\) could not compile")
        for i, kw in enumerate(settings):
            net = small_net()
            opt = RepOptSGD.from_scales(net, scales_for(net), lr=0.1 / (i + 1), compiled=True, **kw)
            train(net, opt, batches(2))
            assert set(opt.path_counts) == {"compiled"}, kw
    assert compiled_update() is compiled_update()
