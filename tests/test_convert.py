"""repopt.to_target and what goes with it, without timm: look-alikes of timm's norm wrapper and multi-branch blocks
(same module path and class name, same attributes), the "looks trained" guard, bias folding, the HS rule by depth."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repopt
from repopt.convert import ConversionError, ConvertedBlock
from repopt.integrations.timm import repvgg_name, scales_for
from repopt.models import CSLAConv2d, create
from repopt.quant.fold import fold_batchnorm
from repopt.reinit import looks_trained
from repopt.search import fold_target_biases
from repopt.targets import declared_branches, target_convs


def _timm_class(cls, module: str):
    cls.__module__ = module
    return cls


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: batch norm, then its `drop` and `act` children."""

    def __init__(self, c, act=True):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d = _timm_class(BatchNormAct2d, "timm.layers.norm_act")


class ConvNormAct(nn.Module):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, act)

    def forward(self, x):
        return self.bn(self.conv(x))


class RepVggBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.reparam_conv = None
        self.identity = BatchNormAct2d(cout, act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = ConvNormAct(cin, cout, 3, stride)
        self.conv_1x1 = ConvNormAct(cin, cout, 1, stride)
        self.drop_path = nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU()
        for m in self.modules():  # timm's RepVggBlock.init_weights
            if isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, .1, .1)
                nn.init.normal_(m.bias, 0, .1)

    def forward(self, x):
        out = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(self.attn(out))

    def reparameterize(self):
        raise AssertionError("to_target must not call it")


class MobileOneBlock(nn.Module):
    def __init__(self, cin, cout, k, stride=1, branches=3, groups=1):
        super().__init__()
        self.reparam_conv = None
        self.identity = BatchNormAct2d(cout, act=False) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvNormAct(cin, cout, k, stride, groups) for _ in range(branches)])
        self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups) if k > 1 else None
        self.drop_path = nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        out = 0 if self.conv_scale is None else self.conv_scale(x)
        for c in self.conv_kxk:
            out = out + c(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(self.attn(out))

    def reparameterize(self):
        raise AssertionError("to_target must not call it")


RepVggBlock = _timm_class(RepVggBlock, "timm.models.byobnet")
MobileOneBlock = _timm_class(MobileOneBlock, "timm.models.byobnet")


class RepMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


RepMixer = _timm_class(RepMixer, "timm.models.fastvit")


class Unknown(nn.Module):  # a re-parameterizable block nobody told repopt about
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

    def switch_to_deploy(self):
        pass


def net():
    """A small stand-in for timm's repvgg / mobileone: stride-2 stem, stage of shape-keeping blocks, head."""
    return nn.Sequential(RepVggBlock(3, 8, 2), RepVggBlock(8, 8), RepVggBlock(8, 8),
                         MobileOneBlock(8, 8, 3, branches=3, groups=8), MobileOneBlock(8, 16, 1, branches=2),
                         MobileOneBlock(16, 16, 1, branches=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5)).double()


def with_statistics(model):
    """The model after a few training-mode batches: BN statistics are no longer at their start."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 12, 12, dtype=torch.float64))
    return model.eval()


def test_to_target_keeps_the_function_and_declares_each_blocks_branch_set():
    torch.manual_seed(0)
    model = net()
    for conv in (model[1].conv_kxk.conv, model[1].conv_1x1.conv):  # biased branch convs: summed into the BN shift
        conv.bias = nn.Parameter(torch.randn(8, dtype=torch.float64))
    model = with_statistics(model)
    target = repopt.to_target(model).eval()
    assert target[1].conv_kxk.conv.bias is None
    assert all(isinstance(target[i], ConvertedBlock) for i in range(6))
    assert isinstance(model[0], RepVggBlock)  # the original is untouched
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(target(x), model(x), rtol=1e-10, atol=1e-12)
    assert target_convs(target) == ["0.conv_kxk.conv", "1.conv_kxk.conv", "2.conv_kxk.conv", "3.conv_kxk.0.conv",
                                    "4.conv_kxk.0.conv", "5.conv_kxk.0.conv"]
    assert declared_branches(target, "0.conv_kxk.conv") == ["3x3", "1x1"]
    assert declared_branches(target, "1.conv_kxk.conv") == ["3x3", "1x1", "identity"]
    assert declared_branches(target, "3.conv_kxk.0.conv") == ["3x3", "3x3_2", "3x3_3", "1x1", "identity"]
    assert declared_branches(target, "4.conv_kxk.0.conv") == ["1x1", "1x1_2"]
    assert declared_branches(target, "5.conv_kxk.0.conv") == ["1x1", "1x1_2", "identity"]
    # a trained multi-branch model stays trained: the guard still fires on its plain copy
    assert looks_trained(target) == "0.conv_kxk.bn"


def test_hyper_search_of_a_converted_model_carries_the_same_branch_sets_and_the_depth_rule():
    torch.manual_seed(0)
    model = net()
    model[5].identity = None  # a block built without its identity branch, though the shapes would allow one
    target = repopt.to_target(model)
    hs = repopt.to_hyper_search(target)
    convs = {n: m for n, m in hs.named_modules() if isinstance(m, CSLAConv2d)}
    assert list(convs) == target_convs(target)
    got = {n: c.branch_names + ["identity"] * (c.identity is not None) for n, c in convs.items()}
    assert got == {n: declared_branches(target, n) for n in convs}
    assert got["5.conv_kxk.0.conv"] == ["1x1", "1x1_2"]
    # the paper's initial scales, by depth: 1 without identity (stem, first stride-2 or widening conv), sqrt(2/l)
    inits = [c.branch_scale(c.branch_names[0])[0].item() for c in convs.values()]
    assert inits == pytest.approx([1, math.sqrt(2), 1, math.sqrt(2 / 3), 1, 1])
    scales = repopt.extract_scales(hs)
    opt = repopt.RepOptSGD.from_scales(target, scales, lr=0.01, momentum=0.9)  # strict: binds every target conv
    assert sum(bs is not None for bs in opt.branch_sets) == 6


def test_fresh_models_never_look_trained_and_trained_ones_do():
    torch.manual_seed(0)
    zero_init = create("repopt_vgg_tiny", num_classes=10)
    with torch.no_grad():
        zero_init.stage1[0].bn.weight.zero_()  # like timm's zero_init_last
    for fresh in (net(), repopt.to_target(net()), zero_init, create("repopt_vgg_tiny", mode="repvgg")):
        assert looks_trained(fresh) is None
    s = repopt.extract_scales(repopt.to_hyper_search(zero_init))
    repopt.RepOptSGD.from_scales(zero_init, s, lr=0.1)  # the guard lets it through
    trained = with_statistics(create("repopt_vgg_tiny", num_classes=10).double())
    assert looks_trained(trained) == "stage0.bn"
    with pytest.raises(repopt.ReinitError, match="stage0.bn.*--force-reinit"):
        repopt.RepOptSGD.from_scales(trained, s, lr=0.1)
    repopt.RepOptSGD.from_scales(trained, s, lr=0.1, force_reinit=True)


def test_refused_blocks_are_named_and_strict_false_keeps_them():
    model = nn.Sequential(net(), RepMixer(), Unknown())
    with pytest.raises(ConversionError, match=r"to_target: 1 is a timm.models.fastvit.RepMixer: its residual"):
        repopt.to_target(model)
    with pytest.raises(ConversionError, match=r"1 is a .*Unknown: repopt knows no plain conv-BN form"):
        repopt.to_target(nn.Sequential(net(), Unknown()))
    with pytest.warns(UserWarning, match=r"2 blocks .* 1 \(RepMixer\), 2 \(Unknown\)"):
        target = repopt.to_target(model, strict=False)
    assert isinstance(target[1], RepMixer) and len(target_convs(target)) == 6
    deployed = net()
    deployed[1].reparam_conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(ConversionError, match="1 .RepVggBlock. is already re-parameterized"):
        repopt.to_target(deployed)
    dropping = net()
    dropping[2].drop_path = nn.Dropout()
    with pytest.raises(ConversionError, match="drop_path"):
        repopt.to_target(dropping)


def test_repopt_repvgg_becomes_its_own_target_mode():
    torch.manual_seed(0)
    repvgg = with_statistics(create("repopt_vgg_tiny", mode="repvgg", num_classes=10).double())
    target = repopt.to_target(repvgg).eval()
    assert target.state_dict().keys() == create("repopt_vgg_tiny", num_classes=10).state_dict().keys()
    assert target.mode == "target" and target_convs(target) == target.target_conv_names()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(target(x), repvgg(x), rtol=1e-10, atol=1e-12)


class BiasedVGG(nn.Module):  # timm's vgg11_bn: conv (with bias) -> BN -> ReLU
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_a_bias_in_front_of_a_batchnorm_is_folded_once_per_model():
    torch.manual_seed(0)
    model = BiasedVGG().double()
    with torch.no_grad():
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-1, 1)
    with_statistics(model)
    assert target_convs(model) == ["features.0", "features.3"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hs = repopt.to_hyper_search(model)
    assert [str(w.message) for w in caught] == [
        "to_hyper_search: the bias of 2 conv(s) feeding a BatchNorm was folded into it (redundant there: the BN "
        "subtracts the mean): features.0, features.3"]
    assert all(isinstance(hs.features[i], CSLAConv2d) for i in (0, 3))
    folded = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="repopt: the bias of 2 conv"):
        assert fold_target_biases(folded) == ["features.0", "features.3"]
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for mode in ("eval", "train"):  # equal at running statistics and with batch statistics
        getattr(model, mode)(), getattr(folded, mode)()
        with torch.no_grad():
            assert torch.allclose(folded(x), model(x), rtol=1e-10, atol=1e-12), mode
    with torch.no_grad():  # the running means moved alike (the batch mean carried the bias before)
        assert torch.allclose(folded.features[1].running_mean,
                              model.features[1].running_mean - model.features[0].bias)
    with pytest.warns(UserWarning, match="to_target: the bias of 2 conv"):
        plain = repopt.to_target(model)
    assert plain.features[0].bias is None and model.features[0].bias is not None


def test_batchnorm_with_children_is_a_target_norm_and_folds_keeping_its_activation():
    torch.manual_seed(0)
    model = with_statistics(nn.Sequential(ConvNormAct(3, 6, 3, act=True), ConvNormAct(6, 6, 3, act=True)).double())
    assert target_convs(model) == ["0.conv", "1.conv"]
    folded = fold_batchnorm(model)
    assert isinstance(folded[0].bn, nn.Sequential) and isinstance(folded[0].bn[1], nn.ReLU)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-10, atol=1e-12)


def test_declared_targets_of_nested_models_are_prefixed():
    backbone = create("repopt_vgg_tiny", num_classes=10)
    model = nn.Sequential(backbone, nn.Conv2d(10, 10, 3), nn.BatchNorm2d(10))
    assert target_convs(model) == [f"0.{n}" for n in backbone.target_conv_names()]


def test_repopt_vgg_names_map_onto_timm_repvgg():
    assert repvgg_name("stage0.conv") == "stem.conv_kxk.conv"
    assert repvgg_name("stage3.7.conv") == "stages.2.7.conv_kxk.conv"
    assert repvgg_name("stage1.0.bn_identity.running_var") == "stages.0.0.identity.running_var"
    assert repvgg_name("stage2.1.conv_1x1.weight") == "stages.1.1.conv_1x1.conv.weight"
    assert repvgg_name("linear.bias") == "head.fc.bias"
    assert repvgg_name("blocks.0.0.ghost1.cheap_operation.0") is None
    hs = create("repopt_vgg_tiny", mode="hs", num_classes=10)
    scales = scales_for(repopt.extract_scales(hs), "timm:repvgg_x")
    assert list(scales)[:2] == ["stem.conv_kxk.conv", "stages.0.0.conv_kxk.conv"]
    assert scales.metadata["arch"] == "timm:repvgg_x"
    ghost = scales_for({"blocks.0.0.ghost1.cheap_operation.0": {"3x3": torch.ones(4)}}, "timm:repghostnet_050")
    assert list(ghost) == ["blocks.0.0.ghost1.cheap_operation.0"]


def test_timm_names_without_timm_fail_with_one_sentence(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ValueError, match="timm: architectures need timm.*pip install timm"):
        create("timm:resnet18")
