"""`repopt.init_from` from timm's own multi-branch state dicts (RepVGG, MobileOne) into the plain `timm:NAME` model:
fused by to_target, the same outputs in eval mode; timm's declared classifier replaced for other classes; the CLI
fine-tunes from such a file. Models are created fresh (pretrained=False): the state dicts are written here, in the
forms timm's weights come in (a safetensors file as on the Hub, a .pth state dict). Skipped where timm is missing."""
import pytest
import torch
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

import repopt  # noqa: E402
from repopt.integrations.timm import create  # noqa: E402

pytestmark = pytest.mark.timm
# name -> multi-branch blocks fused (RepVggBlock / MobileOneBlock)
FUSED = {"repvgg_a0": 22, "mobileone_s0": 43}


def trained_multi_branch(name, classes):
    """timm's multi-branch model with moved BatchNorm statistics (as any trained checkpoint has), in eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_timm_multi_branch_state_dict_fuses_into_the_plain_model(name, fmt, tmp_path):
    multi = trained_multi_branch(name, 10)
    path = tmp_path / f"{name}.{fmt}"
    state = {k: v.contiguous() for k, v in multi.state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    plain = create(f"timm:{name}", mode="target", num_classes=10)
    report = repopt.init_from(plain, path)
    assert len(report.fused) == FUSED[name] and report.head is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = plain.eval()(x), multi(x)
    # float32 rounding of deep nets whose outputs reach ~1e6 here: relative to the largest output
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_timms_declared_classifier_is_replaced_for_other_classes(tmp_path):
    multi = trained_multi_branch("repvgg_a0", 1000)
    path = tmp_path / "repvgg_a0.pth"
    torch.save({"state_dict": multi.state_dict()}, path)
    plain = create("timm:repvgg_a0", mode="target", num_classes=5)
    report = repopt.init_from(plain, path)
    assert report.head == repopt.pretrained.HeadChange("head.fc", (1000, 1280), (5, 1280))
    assert report.describe_head() == ("classifier head.fc (1000, 1280) of the file does not fit 5 classes: replaced "
                                      "by a fresh (5, 1280)")


def test_the_multi_branch_baseline_loads_timms_weights_unfused(tmp_path):
    multi = trained_multi_branch("mobileone_s0", 10)
    path = tmp_path / "m.pth"
    torch.save(multi.state_dict(), path)
    baseline = create("timm:mobileone_s0", mode="repvgg", num_classes=10)
    report = repopt.init_from(baseline, path)
    assert report.fused == () and all(torch.equal(baseline.state_dict()[k], v) for k, v in multi.state_dict().items())


@pytest.mark.parametrize("mode", ["target", "repvgg"])
def test_a_reference_repopt_vgg_checkpoint_loads_into_timms_repvgg(mode, tmp_path):
    """The reference's (and repopt's) RepOpt-VGG names, renamed to timm's byobnet RepVGG names: the same net block for
    block, so timm:repvgg_a0 computes what repopt_vgg_a0 computed (its plain form, or its RepVGG form fused)."""
    from repopt.models import create as create_repopt

    torch.manual_seed(0)
    source = create_repopt("repopt_vgg_a0", mode=mode, num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            source(torch.randn(8, 3, 32, 32))
    path = tmp_path / "RepOpt-VGG-A0.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    plain = create("timm:repvgg_a0", mode="target", num_classes=10)
    report = repopt.init_from(plain, path)
    assert "RepOpt-VGG names renamed to timm's" in report.notes and len(report.fused) == (22 if mode == "repvgg" else 0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = plain.eval()(x), source.eval()(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_cli_fine_tunes_a_timm_model_from_timms_weights(tmp_path, capsys):
    from repopt.app.cli import main

    path = tmp_path / "repvgg_a0.safetensors"
    save_file({k: v.contiguous() for k, v in trained_multi_branch("repvgg_a0", 10).state_dict().items()}, str(path))
    assert main(["train", "--arch", "timm:repvgg_a0", "--method", "plain", "--init-from", str(path), "--epochs", "1",
                 "--image-size", "8", "--batch-size", "256", "--train-subset", "256", "--out", str(tmp_path / "ft")]) \
        == 0
    assert f"[plain] init: loaded {len(create('timm:repvgg_a0').state_dict())} tensors from safetensors file " \
           f"{path}, 22 multi-branch blocks fused into plain convs" in capsys.readouterr().out
