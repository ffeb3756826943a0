"""to_hyper_search on our VGG and on a conv net that is not ours; extract/set scales; the HS weight-decay groups."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repopt
from repopt.models import CSLAConv2d, create
from repopt.search import hs_param_groups, set_scales


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """Not ours: a 5x5 stem, residual blocks, a 1x1 downsample, a biased conv and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.extra = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(self.extra(x).mean((2, 3)))


RESNET_TARGETS = ["stem", "layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2"]


def test_vgg_target_to_hs_matches_hs_mode():
    torch.manual_seed(0)
    target = create("repopt_vgg_small", num_classes=10)
    hs = repopt.to_hyper_search(target)
    built = create("repopt_vgg_small", mode="hs", num_classes=10)
    assert {k: v.shape for k, v in hs.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    got, want = repopt.extract_scales(hs), repopt.extract_scales(built)
    assert list(got) == list(want) == target.target_conv_names()
    for name in want:  # the depth-aware init comes from the model's own rule
        for b in want[name]:
            assert torch.equal(got[name][b], want[name][b]), (name, b)
    assert isinstance(target.stage1[1].conv, nn.Conv2d)  # the original is untouched
    assert torch.equal(hs.stage1[1].conv.convs["3x3"], target.stage1[1].conv.weight)  # full branch keeps the kernel


def test_foreign_resnet():
    torch.manual_seed(0)
    model = TinyResNet().double()
    hs = repopt.to_hyper_search(model)
    convs = {n: m for n, m in hs.named_modules() if isinstance(m, CSLAConv2d)}
    assert list(convs) == RESNET_TARGETS  # 1x1 downsample and the biased conv stay plain
    assert type(hs.layers[1].down[0]) is nn.Conv2d and type(hs.extra) is nn.Conv2d
    assert convs["stem"].branch_names == ["5x5", "3x3", "1x1"]  # a full-size branch is added
    assert convs["stem"].identity is None and convs["layers.0.conv1"].identity is not None
    assert convs["layers.1.conv1"].identity is None and convs["layers.1.conv2"].identity is not None
    # the paper's HS init by depth: 1 without identity (restarting the count), sqrt(2/l) for the l-th with one
    want = {"stem": 1.0, "layers.0.conv1": math.sqrt(2), "layers.0.conv2": 1.0, "layers.1.conv1": 1.0,
            "layers.1.conv2": math.sqrt(2)}
    for name, c in convs.items():
        assert all(torch.allclose(c.branch_scale(b), torch.full_like(c.branch_scale(b), want[name]))
                   for b in c.branch_names), name
    assert convs["stem"].convs["5x5"].dtype == torch.float64
    # untouched rest: every non-HS parameter is equal to the original's
    orig = dict(model.named_parameters())
    for n, p in hs.named_parameters():
        if not any(n.startswith(c + ".") for c in convs):
            assert torch.equal(p, orig[n]), n
    # the scales are keyed by the original model's conv names: the HS net IS the original with W' = (1)
    scales = repopt.extract_scales(hs)
    scales.bind(model)
    with torch.no_grad():
        for name, conv in convs.items():
            model.get_submodule(name).weight.copy_(conv.equivalent_kernel())
    hs.eval(), model.eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(hs(x), model(x), rtol=1e-12, atol=1e-12)


def test_options():
    model = TinyResNet()
    hs = repopt.to_hyper_search(model, select=["layers.0.conv2", "layers.1.down.0"], branches=("1x1",),
                                scale_init=0.5, identity=False)
    convs = {n: m for n, m in hs.named_modules() if isinstance(m, CSLAConv2d)}
    assert list(convs) == ["layers.0.conv2", "layers.1.down.0"]
    assert convs["layers.0.conv2"].branch_names == ["3x3", "1x1"] and convs["layers.1.down.0"].branch_names == ["1x1"]
    assert all(c.identity is None and c.scale_1x1[0].item() == 0.5 for c in convs.values())
    hs = repopt.to_hyper_search(model, select=lambda n, m: n.endswith("conv2"),
                                scale_init=lambda n, conv: 2.0 if n.startswith("layers.1") else 3.0)
    convs = {n: m for n, m in hs.named_modules() if isinstance(m, CSLAConv2d)}
    assert list(convs) == ["layers.0.conv2", "layers.1.conv2"]
    assert convs["layers.1.conv2"].scale_3x3[0].item() == 2.0 and convs["layers.0.conv2"].scale_1x1[0].item() == 3.0
    with pytest.raises(repopt.BranchError, match="layers.1.conv1.*identity"):
        repopt.to_hyper_search(model, select=["layers.1.conv1"], identity=True)
    with pytest.raises(ValueError, match="'extra' has a bias"):
        repopt.to_hyper_search(model, select=["extra"])
    with pytest.raises(ValueError, match="'fc' is a Linear"):
        repopt.to_hyper_search(model, select=["fc"])
    with pytest.raises(repopt.BranchError, match="layers.1.down.0"):
        repopt.to_hyper_search(model, select=["layers.1.down.0"])  # a 3x3 branch does not fit a 1x1 conv


def test_depth_aware_init_rule():
    with torch.device("meta"):
        model = create("repopt_vgg_b0", num_classes=10)
    assert model.hs_scale_init("stage0.conv") == model.hs_scale_init("stage3.0.conv") == 1.0
    assert model.hs_scale_init("stage3.5.conv") == pytest.approx(math.sqrt(2 / 5))
    small = repopt.to_hyper_search(create("repopt_vgg_small", num_classes=10), scale_init=1.0)
    assert all(torch.all(v == 1) for e in repopt.extract_scales(small).values() for v in e.values())


def test_set_scales_errors():
    hs = create("repopt_vgg_tiny", mode="hs", num_classes=10)
    scales = repopt.extract_scales(hs)
    del scales["stage0.conv"]
    with pytest.raises(repopt.ScalesError, match="'stage0.conv' of the model has no scales"):
        set_scales(hs, scales)
    set_scales(hs, scales, strict=False)
    scales["stage9.conv"] = {"3x3": torch.ones(3)}
    with pytest.raises(repopt.ScalesError, match="stage9.conv"):
        set_scales(hs, scales, strict=False)
    del scales["stage9.conv"]
    scales["stage2.1.conv"] = {"3x3": torch.ones(32), "1x1": torch.ones(32)}
    with pytest.raises(repopt.ScalesError, match="stage2.1.conv.*branches"):
        set_scales(hs, scales, strict=False)
    with pytest.raises(repopt.ScalesError, match="no hyper-search conv"):
        repopt.extract_scales(create("repopt_vgg_tiny"))


def test_hs_param_groups():
    hs = create("repopt_vgg_tiny", mode="hs", num_classes=10)
    decay, no_decay = hs_param_groups(hs, 4e-5)
    assert decay["weight_decay"] == 4e-5 and no_decay["weight_decay"] == 0.0
    d, nd = set(decay["param_names"]), set(no_decay["param_names"])
    assert {"stage2.1.conv.identity", "stage2.1.conv.convs.3x3", "stage2.1.conv.convs.1x1", "linear.weight"} <= d
    assert {"stage2.1.conv.scale_3x3", "stage2.1.conv.scale_1x1", "stage2.1.bn.weight", "stage2.1.bn.bias",
            "linear.bias"} <= nd
    assert len(d) + len(nd) == len(list(hs.parameters()))
    csla = create("repopt_vgg_tiny", mode="csla", num_classes=10)  # constant scales are buffers: not in any group
    names = {n for g in hs_param_groups(csla, 1e-4) for n in g["param_names"]}
    assert "stage2.1.conv.identity" in names and not any("scale_" in n for n in names)
