"""Scales files in the format the paper released (`.pth` state dicts of scale vectors) against our models, and
`repopt scales import|show|diff`. The first part builds small files in that format here, so it always runs; the
second reads the released files themselves (../shared/official-scales) where that folder exists.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import repopt
from repopt.app.cli import main
from repopt.models import create, target_convs

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-scales"
needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason=f"released scales folder {OFFICIAL} is missing")
FILES = {"repopt_vgg_b1": "RepOpt-VGG-B1-scales.pth", "repopt_vgg_b2": "RepOpt-VGG-B2-scales.pth",
         "repopt_vgg_l1": "RepOpt-VGG-L1-scales.pth", "repopt_vgg_l2": "RepOpt-VGG-L2-scales.pth"}
GHOST = "RepOptGhostNet_0_5x_scales.pth"


def meta(name):
    with torch.device("meta"):
        return create(name)


def raw(file):
    return torch.load(OFFICIAL / file, map_location="cpu", weights_only=True)


# ---- files in the released format, built here ------------------------------------------------------------------------
VGG_KEYS = {"3x3": "scale_conv", "1x1": "scale_1x1", "identity": "scale_identity"}  # the released names
GHOST_KEYS = {"3x3": "cheap_operation.1", "identity": "fusion_scale"}


def released_keys(scales) -> dict:
    """`scales` under the keys of the released files: `<block>.scale_conv.weight`, ... for RepOpt-VGG's conv
    `<block>.conv`; `<module>.cheap_operation.1.weight` and `<module>.fusion_scale.weight` for RepOpt-GhostNet's
    cheap operation `<module>.cheap_operation.0`. Written from the README of the released files, not from
    repopt's own reader."""
    sd = {}
    for name, entry in scales.items():
        ghost = name.endswith(".cheap_operation.0")
        where, keys = (name.removesuffix(".cheap_operation.0"), GHOST_KEYS) if ghost else \
            (name.removesuffix(".conv"), VGG_KEYS)
        for branch, t in entry.items():
            sd[f"{where}.{keys[branch]}.weight"] = t.clone()
    return sd


def searched(arch: str, seed: int) -> repopt.Scales:
    """Scales that look searched: the HS init plus noise, a few of them negative, identity scales positive."""
    g = torch.Generator().manual_seed(seed)
    init = repopt.extract_scales(create(arch, mode="hs", num_classes=10))
    return repopt.Scales({n: {b: (t + 0.3 * torch.randn(t.shape, generator=g)).abs() if b == "identity" else
                              t + 0.3 * torch.randn(t.shape, generator=g) for b, t in e.items()}
                          for n, e in init.items()})


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """arch -> (.pth in the released format, the scales it holds); VGG files plain and as a DDP checkpoint
    ("state_dict" with "module." keys), GhostNet plain."""
    folder, files = tmp_path_factory.mktemp("released"), {}
    for arch, wrapped, seed in (("repopt_vgg_tiny", False, 1), ("repopt_vgg_small", True, 2),
                                ("repopt_ghostnet_0_5x", False, 3)):
        scales = searched(arch, seed)
        sd = released_keys(scales)
        if wrapped:
            sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 240}
        torch.save(sd, folder / f"{arch}.pth")
        files[arch] = (folder / f"{arch}.pth", scales)
    return files


@pytest.mark.parametrize("arch", ["repopt_vgg_tiny", "repopt_vgg_small", "repopt_ghostnet_0_5x"])
def test_a_released_format_file_loads_exactly_and_binds(released, arch):
    path, want = released[arch]
    got = repopt.load_scales(path)
    assert got.metadata == {"source": f"reference:{path.name}"}
    assert got.keys() == want.keys() == set(target_convs(create(arch)))
    for name, entry in want.items():
        assert got[name].keys() == entry.keys(), name
        assert all(torch.equal(got[name][b], t) for b, t in entry.items()), name
    opt = repopt.RepOptSGD.from_scales(create(arch, num_classes=10), got, lr=0.1)  # strict: every target bound
    assert sum(m is not None for m in opt.branch_sets) == len(want)


def test_cli_import_show_diff_of_a_released_format_file(released, tmp_path, capsys):
    path, want = released["repopt_vgg_small"]
    out = tmp_path / "small.safetensors"
    assert main(["scales", "import", str(path), "-o", str(out)]) == 0  # no --arch: the one model it fits
    assert f"{len(want)} convs for repopt_vgg_small" in capsys.readouterr().out
    imported = repopt.load_scales(out)
    assert imported.metadata["arch"] == "repopt_vgg_small" and imported.metadata["imported_from"] == path.name
    assert main(["scales", "import", str(path), "-o", str(tmp_path / "x.safetensors"), "--arch",
                 "repopt_vgg_tiny"]) == 2
    assert f"{path.name} does not fit repopt_vgg_tiny" in capsys.readouterr().err

    negative = {b: sum(int((e[b] < 0).sum()) for e in want.values() if b in e) for b in ("3x3", "1x1", "identity")}
    assert negative["3x3"] > 0 and negative["identity"] == 0  # the noise made some: the counts below can be wrong
    for source in (path, out):
        assert main(["scales", "show", str(source), "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["convs"] == len(want)
        assert {b: doc["branches"][b]["negative"] for b in negative} == negative
        channels = sum(e["3x3"].numel() for e in want.values())
        assert doc["branches"]["3x3"]["channels"] == channels
        mean = torch.cat([e["3x3"].double() for e in want.values()]).mean().item()
        assert doc["branches"]["3x3"]["mean"] == pytest.approx(mean, rel=1e-12)
    assert main(["scales", "show", str(path)]) == 0
    assert f"all 3x3: {channels} scales, mean {mean:.4f}, {negative['3x3']} negative" in capsys.readouterr().out

    assert main(["scales", "diff", str(out), str(path)]) == 0
    assert "the files equal" in capsys.readouterr().out
    changed = repopt.Scales(want)
    changed["stage3.1.conv"] = {**want["stage3.1.conv"], "1x1": want["stage3.1.conv"]["1x1"] + 0.5}
    torch.save(released_keys(changed), tmp_path / "changed.pth")
    assert main(["scales", "diff", str(path), str(tmp_path / "changed.pth"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(d["layer"], d["branch"]) for d in doc["differing"]] == [("stage3.1.conv", "1x1")]
    assert doc["max_abs"] == pytest.approx(0.5)

    ghost, _ = released["repopt_ghostnet_0_5x"]
    assert main(["scales", "import", str(ghost), "-o", str(tmp_path / "g.safetensors")]) == 0
    assert repopt.load_scales(tmp_path / "g.safetensors").metadata["arch"] == "repopt_ghostnet_0_5x"


# ---- the released files themselves -----------------------------------------------------------------------------------
@needs_official
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


@needs_official
def test_l1_layout_matches_the_file():
    sd = raw(FILES["repopt_vgg_l1"])
    blocks = [1] + [len({k.split(".")[1] for k in sd if k.startswith(f"stage{s}.")}) for s in range(1, 5)]
    chans = [sd["stage0.scale_conv.weight"].numel()]
    chans += [sd[f"stage{s}.0.scale_conv.weight"].numel() for s in range(1, 5)]
    assert blocks == [1, 8, 14, 24, 1] and chans == [64, 128, 256, 512, 2048]
    model = meta("repopt_vgg_l1")
    assert [1] + [len(getattr(model, f"stage{s}")) for s in range(1, 5)] == blocks


@needs_official
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


@needs_official
def test_b1_into_b2_names_the_first_mismatching_layer():
    scales = repopt.load_scales(OFFICIAL / FILES["repopt_vgg_b1"])
    with pytest.raises(repopt.ScalesError, match=r"stage1\.0\.conv.*128.*160"):
        scales.bind(meta("repopt_vgg_b2"))


@needs_official
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


# ---- CLI on the released files ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b1_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("scales") / "b1.safetensors"
    assert main(["scales", "import", str(OFFICIAL / FILES["repopt_vgg_b1"]), "-o", str(out),
                 "--arch", "repopt_vgg_b1"]) == 0
    return out


@needs_official
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


@needs_official
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


@needs_official
def test_cli_plot(b1_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b1.png"
    assert main(["scales", "show", str(b1_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_official
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
