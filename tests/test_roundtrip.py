"""Every registered architecture goes the whole way: HS model -> extract_scales -> scales file -> RepOptSGD.from_scales
on its target model -> optimizer steps that apply each target conv's multiplier (and the same from
to_hyper_search(target)). Issue 12: RepOpt-GhostNet's own HS scales did not bind to its target model.

The big VGGs (tens of millions of weights) bind on the meta device, with their HS kernels left uninitialised (the scales
are real: they come from the HS model's own init): the binding is what differs between architectures, and it costs
nothing that way; the steps run on meta tensors too (shapes only). The small ones train for real, and their first step
is checked against M * G.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import repopt
import repopt.models.csla_conv as csla_conv
from repopt.models import create, list_models, target_convs

REAL_LIMIT = 2_000_000  # weights of the target model; larger models bind on the meta device
NUM_CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _size(arch: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create(arch, num_classes=NUM_CLASSES).parameters())


SMALL = [a for a in list_models() if _size(a) < REAL_LIMIT]


@contextlib.contextmanager
def _no_kernel_init():
    """HS branch kernels stay uninitialised (torch.empty): the scales are all this test reads from the HS model."""
    real = csla_conv.default_conv_init_
    csla_conv.default_conv_init_ = lambda weight, generator=None: weight
    try:
        yield
    finally:
        csla_conv.default_conv_init_ = real


def _through_file(scales, tmp_path):
    path = repopt.save_scales(scales, tmp_path / "scales.safetensors")
    loaded = repopt.load_scales(path)
    assert loaded.keys() == scales.keys()
    for name, entry in scales.items():
        assert loaded[name].keys() == entry.keys()
        assert all(torch.equal(loaded[name][b], t) for b, t in entry.items()), name
    return loaded


def _bound_names(opt) -> set[str]:
    return {bs.name for bs in opt.branch_sets if bs is not None}


def _train_and_check(target, scales):
    """From_scales, then a plain SGD step checked against M * G (target convs) and G (the rest), then two more."""
    torch.manual_seed(0)
    opt = repopt.RepOptSGD.from_scales(target, scales, lr=0.1)
    assert _bound_names(opt) == set(target_convs(target))
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    F.cross_entropy(target(x), y).backward()
    grads = {n: p.grad.clone() for n, p in target.named_parameters()}
    opt.step()
    bound = {n + ".weight": bs for n, (_, bs) in scales.bind(target).items()}
    for n, p in target.named_parameters():
        g = grads[n] if n not in bound else (bound[n].sgd_multiplier() * grads[n].double()).float()
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g, msg=n)
    assert any(not torch.equal(bound[n].sgd_multiplier(), torch.ones_like(bound[n].sgd_multiplier()))
               for n in bound)  # the check above would not tell RepOpt from SGD otherwise
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(target(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in target.parameters())


@pytest.mark.parametrize("arch", list_models())
def test_hs_scales_train_the_target_model(arch, tmp_path):
    if arch in SMALL:
        hs, target = create(arch, mode="hs", num_classes=NUM_CLASSES), create(arch, num_classes=NUM_CLASSES)
    else:
        with _no_kernel_init():
            hs = create(arch, mode="hs", num_classes=NUM_CLASSES)
        with torch.device("meta"):
            target = create(arch, num_classes=NUM_CLASSES)
    scales = _through_file(repopt.extract_scales(hs), tmp_path)
    assert set(scales) == set(target_convs(target))
    if arch in SMALL:
        _train_and_check(target, scales)
        return
    opt = repopt.RepOptSGD.from_scales(target, scales, lr=0.1, momentum=0.9, reinit=False)  # meta: nothing to init
    assert _bound_names(opt) == set(target_convs(target))
    F.cross_entropy(target(torch.randn(2, 3, 16, 16, device="meta")), torch.zeros(2, dtype=torch.long,
                                                                                  device="meta")).backward()
    opt.step()


@pytest.mark.parametrize("arch", SMALL)
def test_to_hyper_search_of_the_target_model(arch, tmp_path):
    """A user's path for a model of their own, taken here with ours: to_hyper_search(target) -> scales -> train."""
    hs = repopt.to_hyper_search(create(arch, num_classes=NUM_CLASSES))
    scales = _through_file(repopt.extract_scales(hs), tmp_path)
    assert set(scales) == set(target_convs(hs))  # the HS copy keeps the target's own list of target convs
    _train_and_check(create(arch, num_classes=NUM_CLASSES), scales)
