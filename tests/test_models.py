"""RepOpt-VGG family and RepOpt-GhostNet: configs, module names, per-mode structure and init, RepVGG fusion."""
import math

import pytest
import torch
from torch import nn

import repopt
from repopt.models import CSLAConv2d, create, list_models, reparameterize_model, target_convs


def meta(name, **kw):
    with torch.device("meta"):  # shapes only: the big models cost nothing
        return create(name, **kw)


def channels(model):
    return [model.stage0.conv.out_channels] + [getattr(model, f"stage{k}")[-1].conv.out_channels for k in range(1, 5)]


def depths(model):
    return [1] + [len(getattr(model, f"stage{k}")) for k in range(1, 5)]


@pytest.mark.parametrize("name, chans, blocks", [
    ("repopt_vgg_a0", [48, 48, 96, 192, 1280], [1, 2, 4, 14, 1]),
    ("repopt_vgg_a1", [64, 64, 128, 256, 1280], [1, 2, 4, 14, 1]),
    ("repopt_vgg_a2", [64, 96, 192, 384, 1408], [1, 2, 4, 14, 1]),
    ("repopt_vgg_b0", [64, 64, 128, 256, 1280], [1, 4, 6, 16, 1]),
    ("repopt_vgg_b1", [64, 128, 256, 512, 2048], [1, 4, 6, 16, 1]),
    ("repopt_vgg_b2", [64, 160, 320, 640, 2560], [1, 4, 6, 16, 1]),
    ("repopt_vgg_b3", [64, 192, 384, 768, 2560], [1, 4, 6, 16, 1]),
    ("repopt_vgg_l1", [64, 128, 256, 512, 2048], [1, 8, 14, 24, 1]),
    ("repopt_vgg_l2", [64, 160, 320, 640, 2560], [1, 8, 14, 24, 1]),
])
def test_paper_configs(name, chans, blocks):
    m = meta(name)
    assert channels(m) == chans and depths(m) == blocks
    assert [getattr(m, f"stage{k}")[0].conv.stride for k in range(1, 5)] == [(2, 2)] * 4
    assert m.stage0.conv.stride == (2, 2) and m.linear.in_features == chans[-1] and m.linear.out_features == 1000


def test_registry():
    names = list_models()
    for v in ("a0", "a1", "a2", "b0", "b1", "b2", "b3", "l1", "l2", "tiny", "small"):
        assert f"repopt_vgg_{v}" in names
    assert "repopt_ghostnet_0_5x" in names
    with pytest.raises(ValueError, match="unknown model"):
        create("repopt_vgg_z9")
    with pytest.raises(ValueError, match="unknown mode"):
        create("repopt_vgg_tiny", mode="plain")
    with pytest.raises(ValueError, match="5 values"):
        create("repopt_vgg_tiny", strides=(2, 2))


def test_reference_module_names():
    m = create("repopt_vgg_tiny", num_classes=10)
    names = m.target_conv_names()
    assert names[:3] == ["stage0.conv", "stage1.0.conv", "stage2.0.conv"] and names[-1] == "stage4.0.conv"
    assert names == repopt.find_target_convs(m) == target_convs(m)
    assert all(m.get_submodule(n).bias is None and m.get_submodule(n).kernel_size == (3, 3) for n in names)
    assert isinstance(m.linear, nn.Linear) and m.linear.out_features == 10


def test_strides_and_forward():
    x = torch.randn(2, 3, 32, 32)
    tiny = create("repopt_vgg_tiny", num_classes=10)
    assert tiny.config.strides == (1, 1, 2, 2, 2) and tiny(x).shape == (2, 10)
    five = create("repopt_vgg_tiny", num_classes=10, strides=(2, 2, 2, 2, 2))
    shapes = []
    five.stage4.register_forward_hook(lambda mod, i, o: shapes.append(o.shape))
    five(x)
    assert shapes[0][-2:] == (1, 1)  # 32 / 2^5
    assert create("repopt_vgg_small", num_classes=100, mode="hs")(x).shape == (2, 100)


@pytest.mark.parametrize("mode", ["hs", "csla"])
def test_hs_and_csla_blocks(mode):
    m = create("repopt_vgg_small", mode=mode, num_classes=10)
    convs = {n: mod for n, mod in m.named_modules() if isinstance(mod, CSLAConv2d)}
    assert list(convs) == create("repopt_vgg_small").target_conv_names()
    for name, conv in convs.items():
        stage, index = name.split(".")[0], (int(name.split(".")[1]) if not name.startswith("stage0") else 0)
        g = conv.geometry
        assert conv.branch_names == ["3x3", "1x1"]
        assert (conv.identity is not None) == (g.in_channels == g.out_channels and g.stride == (1, 1))
        expect = 1.0 if stage == "stage0" or index == 0 else math.sqrt(2.0 / index)
        for b in ("3x3", "1x1"):
            s = conv.branch_scale(b)
            assert torch.allclose(s, torch.full_like(s, expect))
            assert isinstance(s, nn.Parameter) == (mode == "hs")
        if conv.identity is not None:
            assert isinstance(conv.identity, nn.Parameter) and torch.all(conv.identity == 1)
        block = m.get_submodule(name.rpartition(".")[0])
        assert isinstance(block.bn, nn.BatchNorm2d) and isinstance(block.relu, nn.ReLU)
    # the first block of stage1 keeps its width at stride 1, so it has an identity and still starts at 1.0
    assert convs["stage1.0.conv"].identity is not None
    assert convs["stage1.0.conv"].branch_scale("3x3")[0].item() == 1.0
    assert convs["stage1.1.conv"].branch_scale("3x3")[0].item() == pytest.approx(math.sqrt(2.0))
    assert convs["stage2.2.conv"].branch_scale("1x1")[0].item() == pytest.approx(1.0)


def test_extract_scales_keys_are_target_conv_names():
    hs = create("repopt_vgg_tiny", mode="hs", num_classes=10)
    target = create("repopt_vgg_tiny", num_classes=10)
    scales = repopt.extract_scales(hs)
    assert list(scales) == target.target_conv_names() and scales.metadata["arch"] == "repopt_vgg_tiny"
    assert set(scales["stage2.1.conv"]) == {"3x3", "1x1", "identity"} and set(scales["stage0.conv"]) == {"3x3", "1x1"}
    scales.bind(target)  # strict: every target conv covered
    # and back: a CSLA model built with those scales holds them as constants
    for v in scales["stage2.1.conv"].values():
        v.mul_(-0.5)
    csla = create("repopt_vgg_tiny", mode="csla", num_classes=10, scales=scales)
    assert torch.equal(csla.stage2[1].conv.scale_3x3, scales["stage2.1.conv"]["3x3"])
    assert torch.equal(csla.stage2[1].conv.identity.detach(), scales["stage2.1.conv"]["identity"])
    with pytest.raises(ValueError, match="only applies"):
        create("repopt_vgg_tiny", scales=scales)


def _randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(c, generator=gen, dtype=m.bias.dtype))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_repvgg_reparameterize(dtype, tol):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = create("repopt_vgg_tiny", mode="repvgg", num_classes=10).to(dtype)
    _randomize_bn(model, gen)
    model.eval()
    assert model.stage1[0].bn_identity is not None and model.stage2[0].bn_identity is None
    x = torch.randn(4, 3, 32, 32, dtype=dtype, generator=gen)
    with torch.no_grad():
        ref = model(x)
        fused = reparameterize_model(model)
        out = fused(x)
    assert not hasattr(model.stage1[0], "conv")  # inplace=False left the original alone
    assert {type(m) for m in fused.modules()}.isdisjoint({nn.BatchNorm2d})
    assert all(fused.get_submodule(n).bias is not None for n in create("repopt_vgg_tiny").target_conv_names())
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    same = reparameterize_model(model, inplace=True)
    assert same is model and model.stage1[0].reparameterized
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_ghostnet_structure():
    torch.manual_seed(0)
    m = create("repopt_ghostnet_0_5x", num_classes=10)
    names = m.target_conv_names()
    assert len(names) == 32 and names[0] == "blocks.0.0.ghost1.cheap_operation.0"
    for n in names:
        conv = m.get_submodule(n)
        assert conv.groups == conv.in_channels == conv.out_channels and conv.kernel_size == (3, 3)
    assert set(names) <= set(repopt.find_target_convs(m))  # each cheap conv feeds its module's BN
    n_params = sum(p.numel() for p in meta("repopt_ghostnet_0_5x").parameters())
    assert n_params == pytest.approx(2.3e6, rel=0.02)  # RepGhostNet 0.5x at 1000 classes: 2.3M
    m.eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    hs = create("repopt_ghostnet_0_5x", mode="hs", num_classes=10)
    scales = repopt.extract_scales(hs)
    assert list(scales) == names and all(set(e) == {"3x3", "identity"} for e in scales.values())
    # chain position l of a ghost module starts at sqrt(2 / (l + 1)): blocks.8.1 is the 3rd bottleneck of its chain
    assert scales["blocks.8.1.ghost1.cheap_operation.0"]["3x3"][0] == pytest.approx(math.sqrt(2 / 6))
    assert scales["blocks.8.1.ghost2.cheap_operation.0"]["3x3"][0] == pytest.approx(math.sqrt(2 / 7))
