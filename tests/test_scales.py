"""The released reference scales (../shared/official-scales) against our models, and `repopt scales` (CLI)."""
import json
import math
from pathlib import Path

import pytest
import torch

import repopt
from repopt.app.cli import main
from repopt.models import create

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-scales"
pytestmark = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"released scales folder {OFFICIAL} is missing")
FILES = {"repopt_vgg_b1": "RepOpt-VGG-B1-scales.pth", "repopt_vgg_b2": "RepOpt-VGG-B2-scales.pth",
         "repopt_vgg_l1": "RepOpt-VGG-L1-scales.pth", "repopt_vgg_l2": "RepOpt-VGG-L2-scales.pth"}
GHOST = "RepOptGhostNet_0_5x_scales.pth"


def meta(name):
    with torch.device("meta"):
        return create(name)


def raw(file):
    return torch.load(OFFICIAL / file, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch, file", FILES.items())
def test_released_vgg_files_bind(arch, file):
    scales = repopt.load_scales(OFFICIAL / file)
    model = meta(arch)
    bound = scales.bind(model)  # strict: every target conv has scales, every entry fits
    assert list(bound) == model.target_conv_names()
    sd = raw(file)
    assert len(sd) == sum(len(e) for e in scales.values())
    for name, entry in scales.items():
        block = name.removesuffix(".conv")
        keys = {"3x3": "scale_conv", "1x1": "scale_1x1", "identity": "scale_identity"}
        for branch, v in entry.items():
            assert torch.equal(v, sd[f"{block}.{keys[branch]}.weight"])
        assert ("identity" in entry) == (not name.endswith(".0.conv") and name != "stage0.conv")


def test_l1_layout_matches_the_file():
    sd = raw(FILES["repopt_vgg_l1"])
    blocks = [1] + [len({k.split(".")[1] for k in sd if k.startswith(f"stage{s}.")}) for s in range(1, 5)]
    chans = [sd["stage0.scale_conv.weight"].numel()]
    chans += [sd[f"stage{s}.0.scale_conv.weight"].numel() for s in range(1, 5)]
    assert blocks == [1, 8, 14, 24, 1] and chans == [64, 128, 256, 512, 2048]
    model = meta("repopt_vgg_l1")
    assert [1] + [len(getattr(model, f"stage{s}")) for s in range(1, 5)] == blocks


def test_b1_multipliers_equal_math_3_from_the_file():
    torch.manual_seed(0)
    model = create("repopt_vgg_b1", num_classes=1000)
    scales = repopt.load_scales(OFFICIAL / FILES["repopt_vgg_b1"])
    opt = repopt.RepOptSGD.from_scales(model, scales, reinit=False, lr=0.1, momentum=0.9, nesterov=True,
                                       weight_decay=4e-5)
    sd = raw(FILES["repopt_vgg_b1"])
    params = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            bs = opt.multiplier_of(gi, pi)
            name = params[id(p)]
            if bs is None:
                assert not name.endswith("conv.weight")
                continue
            block = name.removesuffix(".conv.weight")
            s, t = sd[f"{block}.scale_conv.weight"].double(), sd[f"{block}.scale_1x1.weight"].double()
            m = s.square().view(-1, 1, 1, 1).expand(p.shape).clone()  # MATH (3): s^2 everywhere,
            m[:, :, 1, 1] += t.square().view(-1, 1)  # + t^2 at the centre,
            if f"{block}.scale_identity.weight" in sd:
                m[:, :, 1, 1] += torch.eye(p.shape[0], dtype=torch.float64)  # + 1 at the diagonal centre
            assert torch.equal(bs.sgd_multiplier(), m), name
            seen += 1
    assert seen == 28


def test_b1_into_b2_names_the_first_mismatching_layer():
    scales = repopt.load_scales(OFFICIAL / FILES["repopt_vgg_b1"])
    with pytest.raises(repopt.ScalesError, match=r"stage1\.0\.conv.*128.*160"):
        scales.bind(meta("repopt_vgg_b2"))


def test_ghostnet_file_loads():
    scales = repopt.load_scales(OFFICIAL / GHOST)
    model = create("repopt_ghostnet_0_5x", num_classes=1000)
    bound = scales.bind(model, strict=False)  # the file covers the cheap operations only
    assert sorted(bound) == sorted(model.target_conv_names()) and len(bound) == 32
    sd = raw(GHOST)
    for name, (conv, bs) in bound.items():
        module = name.removesuffix(".cheap_operation.0")
        s, a = sd[f"{module}.cheap_operation.1.weight"], sd[f"{module}.fusion_scale.weight"]
        assert conv.out_channels == s.numel() == a.numel()
        m = s.double().square().view(-1, 1, 1, 1).expand(conv.weight.shape).clone()
        m[:, 0, 1, 1] += 1  # depthwise: the identity tap of channel c is [c, 0, centre]
        assert torch.equal(bs.sgd_multiplier(), m), name
    # the last modules barely trained (on 32x32 inputs): they still sit at our HS init sqrt(2 / (l + 1))
    init = repopt.extract_scales(create("repopt_ghostnet_0_5x", mode="hs"))
    for name in ("blocks.7.0.ghost2.cheap_operation.0", "blocks.8.1.ghost2.cheap_operation.0"):
        assert torch.allclose(scales[name]["3x3"], init[name]["3x3"], atol=1e-4)
    opt = repopt.RepOptSGD.from_scales(model, scales, lr=0.1)  # strict: every target has its scales
    assert sum(m is not None for m in opt.branch_sets) == 32


# ---- CLI -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b1_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("scales") / "b1.safetensors"
    assert main(["scales", "import", str(OFFICIAL / FILES["repopt_vgg_b1"]), "-o", str(out),
                 "--arch", "repopt_vgg_b1"]) == 0
    return out


def test_cli_import(b1_file, tmp_path, capsys):
    scales = repopt.load_scales(b1_file)
    assert scales.metadata["arch"] == "repopt_vgg_b1" and len(scales) == 28
    ref = repopt.load_scales(OFFICIAL / FILES["repopt_vgg_b1"])
    assert all(torch.equal(scales[n][b], ref[n][b]) for n in ref for b in ref[n])
    capsys.readouterr()
    src = str(OFFICIAL / FILES["repopt_vgg_b1"])
    assert main(["scales", "import", src, "-o", str(b1_file), "--arch", "repopt_vgg_b1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["scales", "import", src, "-o", str(tmp_path / "x.safetensors"), "--arch", "repopt_vgg_b2"]) == 2
    err = capsys.readouterr().err
    assert "RepOpt-VGG-B1-scales.pth does not fit repopt_vgg_b2" in err and "stage1.0.conv" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["scales", "import", src, "-o", str(tmp_path / "x.safetensors"), "--arch", "nope"]) == 2
    assert "unknown --arch" in capsys.readouterr().err
    ghost = tmp_path / "g.safetensors"  # no --arch: the one model the file fits
    assert main(["scales", "import", str(OFFICIAL / GHOST), "-o", str(ghost)]) == 0
    assert repopt.load_scales(ghost).metadata["arch"] == "repopt_ghostnet_0_5x"
    assert main(["scales", "import", src, "-o", str(tmp_path / "y.safetensors"), "--arch", "repopt_vgg_b1",
                 "--force"]) == 0


def test_cli_show(b1_file, tmp_path, capsys):
    assert main(["scales", "show", str(b1_file)]) == 0
    out = capsys.readouterr().out
    assert "stage3" in out and "all 3x3: 12352 scales" in out and "85 negative" in out and "71 negative" in out
    assert main(["scales", "show", str(b1_file), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["convs"] == 28 and doc["branches"]["3x3"]["negative"] == 85
    assert doc["branches"]["identity"]["negative"] == 0
    row = next(r for r in doc["rows"] if r["stage"] == "stage3" and r["branch"] == "identity")
    assert row["convs"] == 15 and row["channels"] == 15 * 512 and row["min"] <= row["mean"] <= row["max"]
    assert main(["scales", "show", str(b1_file), "--layers", "--json"]) == 0
    assert len([r for r in json.loads(capsys.readouterr().out)["rows"] if r["branch"] == "3x3"]) == 28
    assert main(["scales", "show", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_plot(b1_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b1.png"
    assert main(["scales", "show", str(b1_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_diff(b1_file, tmp_path, capsys):
    assert main(["scales", "diff", str(b1_file), str(OFFICIAL / FILES["repopt_vgg_b1"])]) == 0
    assert "the files equal" in capsys.readouterr().out
    changed = repopt.load_scales(b1_file)
    changed["stage2.3.conv"]["1x1"][5] += 0.25
    del changed["stage4.0.conv"]
    other = repopt.save_scales(changed, tmp_path / "changed.safetensors")
    assert main(["scales", "diff", str(b1_file), str(other), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["only_in_a"] == ["stage4.0.conv"] and not doc["equal"]
    assert doc["differing"][0]["layer"] == "stage2.3.conv" and doc["differing"][0]["branch"] == "1x1"
    assert math.isclose(doc["max_abs"], 0.25, rel_tol=1e-6)
    assert main(["scales", "diff", str(b1_file), str(OFFICIAL / FILES["repopt_vgg_b2"])]) == 1
    assert "stage1.0.conv" in capsys.readouterr().out
