"""Whole-network proof (MATH.md, SGD family): a RepOpt-VGG in CSLA form trained by torch SGD equals the same net in
target form trained by RepOptSGD from the equivalent start, with BatchNorm (train mode) and ReLU in between.

Every target conv is initialised to its CSLA block's equivalent kernel W' (1); BN and head parameters are copied.
CSLA parameter groups: decay on branch kernels, identity scales and the head weight (the HS recipe); the target's
default groups decay every >= 2-D weight, so both sides decay exactly lambda * W' per MATH (3).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import repopt
from repopt.models import CSLAConv2d, create
from repopt.search import hs_param_groups, set_scales

STEPS, LR, MOMENTUM, WD = 60, 0.02, 0.9, 5e-3


def _random_scales(csla, gen):
    scales = repopt.extract_scales(csla)
    for entry in scales.values():
        for branch, v in entry.items():
            low, high = (0.5, 1.5) if branch == "identity" else (-1.5, 1.5)  # some negative conv-branch scales
            v.copy_((torch.rand(v.shape, generator=gen) * (high - low) + low).float())
    return scales


def _start(gen):
    torch.manual_seed(0)
    csla = create("repopt_vgg_tiny", mode="csla", num_classes=10).double()
    scales = _random_scales(csla, gen)
    set_scales(csla, scales)
    target = create("repopt_vgg_tiny", mode="target", num_classes=10).double()
    convs = {n: m for n, m in csla.named_modules() if isinstance(m, CSLAConv2d)}
    with torch.no_grad():
        for name, conv in convs.items():
            target.get_submodule(name).weight.copy_(conv.equivalent_kernel())
        sd = csla.state_dict()
        for k, v in target.state_dict().items():
            if not k.endswith("conv.weight"):
                v.copy_(sd[k])
    return csla, target, convs, scales


def _max_rel_err(target, convs):
    worst = 0.0
    for name, conv in convs.items():
        w_eq = conv.equivalent_kernel().detach()
        w = target.get_submodule(name).weight.detach()
        worst = max(worst, ((w - w_eq).abs().max() / w_eq.abs().max()).item())
    return worst


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_csla_network_equals_target_with_repopt_sgd(one_thread):
    gen = torch.Generator().manual_seed(1)
    csla, target, convs, scales = _start(gen)
    assert _max_rel_err(target, convs) == 0.0
    plain = copy.deepcopy(target)
    opt_csla = torch.optim.SGD(hs_param_groups(csla, WD), lr=LR, momentum=MOMENTUM, nesterov=True)
    opt_target = repopt.RepOptSGD.from_scales(target, scales, reinit=False, lr=LR, momentum=MOMENTUM, nesterov=True,
                                              weight_decay=WD)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(STEPS)]
    worst = 0.0
    for i in range(0, STEPS, 10):  # check along the way, not only at the end
        _train(csla, opt_csla, batches[i:i + 10])
        _train(target, opt_target, batches[i:i + 10])
        worst = max(worst, _max_rel_err(target, convs))
    assert worst <= 1e-10, worst
    moved = max(((target.get_submodule(n).weight - plain.get_submodule(n).weight).abs().max()
                 / plain.get_submodule(n).weight.abs().max()).item() for n in convs)
    assert moved > 1e-2  # the kernels really trained
    csla.eval(), target.eval()
    x = batches[0][0]
    with torch.no_grad():
        a, b = csla(x), target(x)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-10
    for k, v in target.state_dict().items():  # BN statistics and head followed too
        if not k.endswith("conv.weight"):
            assert torch.allclose(v.double(), csla.state_dict()[k].double(), rtol=1e-9, atol=1e-12), k

    # the control: plain SGD on the same target start does not follow the CSLA net
    opt_plain = torch.optim.SGD(repopt.param_groups(plain, WD), lr=LR, momentum=MOMENTUM, nesterov=True)
    _train(plain, opt_plain, batches[:STEPS])
    assert _max_rel_err(plain, convs) > 1e-3
