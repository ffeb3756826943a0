"""BN folding and INT8 quantization (PTQ / QAT through torchao PT2E, lowered to oneDNN int8 kernels)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from repopt.quant import (Int8Model, QuantDependencyError, QuantSettings, conv_bn_pairs, cpu_has_vnni, evaluate_top1,
                          fold_batchnorm, quantize_ptq, quantize_qat, time_per_batch_ms)


def block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class AttrBlock(nn.Module):
    """Attribute-style block (conv, bn, act registered in the order they run)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=True)  # a conv bias must be folded too
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TinyVGG(nn.Module):
    def __init__(self, widths=(8, 16, 16), num_classes=10):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers.append(AttrBlock(cin, w) if i == 1 else block(cin, w, stride=2 if i == 2 else 1))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, cin, 1)  # a conv with no BN after it: must stay as is
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.head(self.features(x)))), 1))


def with_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN: random affine parameters and running statistics far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return with_bn_stats(TinyVGG())


# ---------------------------------------------------------------- folding

def test_fold_float64_exact(model):
    m64 = with_bn_stats(TinyVGG().double())
    folded = fold_batchnorm(m64)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert (folded(x) - m64(x)).abs().max().item() < 1e-10


def test_fold_float32_and_structure(model):
    folded = fold_batchnorm(model)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded.features[1].bn, nn.Identity) and isinstance(folded.features[0][1], nn.Identity)
    assert all(folded.get_submodule(c).bias is not None for c, _ in conv_bn_pairs(model))
    assert torch.equal(folded.head.weight, model.head.weight)
    # inplace=False leaves the original alone
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3


def test_fold_inplace_and_subclass_untouched():
    class MultiBranch(nn.Conv2d):  # a conv subclass may not compute `weight` alone: never fold it
        pass

    m = nn.Sequential(MultiBranch(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, bias=False),
                      nn.BatchNorm2d(4))
    assert conv_bn_pairs(m) == [("2", "3")]
    out = fold_batchnorm(m, inplace=True)
    assert out is m and isinstance(m[1], nn.BatchNorm2d) and isinstance(m[3], nn.Identity)


# ---------------------------------------------------------------- settings, dependency

def test_settings_dict_and_validation():
    d = QuantSettings().to_dict()
    assert d["per_channel"] is True and d["reduce_range"] is (not cpu_has_vnni())
    assert d["calib_batches"] == 32 and d["is_qat"] is False and "qat_lr" not in d
    assert "qat_lr" in QuantSettings(is_qat=True).to_dict()
    assert QuantSettings(reduce_range=False).resolved().reduce_range is False
    with pytest.raises(ValueError):
        QuantSettings(activation_observer="percentile")
    with pytest.raises(ValueError):
        QuantSettings(calib_batches=0)


def test_missing_torchao_names_the_extra(without_torchao, model):
    with pytest.raises(QuantDependencyError, match=r"pip install 'repopt\[quant\]'") as info:
        quantize_ptq(model, [torch.randn(2, 3, 16, 16)])
    assert isinstance(info.value, ImportError)


# ---------------------------------------------------------------- INT8 (needs torchao)

@pytest.fixture(scope="module")
def torchao():
    return pytest.importorskip("torchao", reason="INT8 tests need the `quant` extra: pip install 'repopt[quant]'")


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 16, 16, generator=g) for _ in range(4)] + [torch.randn(5, 3, 16, 16, generator=g)]


@pytest.fixture(scope="module")
def int8(torchao, model, calib):
    return quantize_ptq(model, calib, QuantSettings(calib_batches=8))


def test_ptq_runs_int8_kernels(int8):
    ops = int8.quantized_ops()
    assert ops.get("onednn.qconv_pointwise.default") == 4  # three 3x3 convs and the 1x1 head
    assert ops.get("onednn.qlinear_pointwise.default") == 1
    assert isinstance(int8, Int8Model) and int8.batch_size == 16
    report = int8.report()
    assert report["images_seen"] == 4 * 16 + 5 and report["int8_ops"] == ops and report["per_channel"] is True


def test_ptq_close_to_fp32(int8, model):
    # Measured on this tiny model: relative error ~0.5 %, top-1 agreement 100 %; bounds leave a wide margin.
    x = torch.randn(200, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = model(x), int8(x)  # 200 = 12 full chunks of 16 and a zero-padded one of 8
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() > 0.9
    with torch.no_grad():
        assert torch.allclose(int8(x[:3]), out[:3], atol=1e-6)
    with pytest.raises(RuntimeError):
        int8.train()


def test_ptq_per_tensor_weights_share_one_scale(torchao, model, calib):
    # A first batch of one must not pin the export to batch 1 (the 16-batch after it still calibrates).
    q = quantize_ptq(model, [calib[0][:1], calib[1]], QuantSettings(per_channel=False, activation_observer="minmax"))
    assert q.batch_size == 1 and q(calib[2][:3]).shape == (3, 10)
    convs = [n for n in q.graph.graph.nodes if n.op == "call_function" and str(n.target).startswith("onednn.qconv")]
    assert len(convs) == 4
    for node in convs:
        scale = getattr(q.graph, node.args[4].target)  # (x, x_scale, x_zp, w, w_scale, ...)
        assert scale.numel() > 1 and torch.all(scale == scale[0])


def test_ptq_rejects_qat_settings(model):
    with pytest.raises(ValueError, match="quantize_qat"):
        quantize_ptq(model, [torch.randn(2, 3, 16, 16)], QuantSettings(is_qat=True))


def test_qat_smoke(torchao, model):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]
    q = quantize_qat(model, data, QuantSettings(qat_epochs=2, qat_lr=1e-3))
    assert q.settings.is_qat and q.report()["qat_epochs"] == 2 and q.images_seen == 2 * 4 * 8
    assert q.quantized_ops().get("onednn.qconv_pointwise.default") == 4
    x = torch.cat([d[0] for d in data])
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert ((out - ref).norm() / ref.norm()).item() < 0.5  # a short, small-lr fine-tune stays near the fp32 model
    labels = torch.cat([d[1] for d in data])
    assert evaluate_top1(q, data) == pytest.approx(100.0 * (out.argmax(1) == labels).double().mean().item())


def test_evaluate_and_time(model):
    x = torch.randn(6, 3, 16, 16)
    y = model(x).argmax(1)
    assert evaluate_top1(model, [(x[:4], y[:4]), (x[4:], y[4:])]) == 100.0
    assert time_per_batch_ms(model, x, repeats=3, warmup=1) > 0
