"""RepOpt on real timm models (run in their own venv: torch 2.14.1 + torchvision 0.29.1 + timm; `.ci/run` does it).

Every model is created fresh with pretrained=False: nothing downloads. Skipped where timm is not installed.
"""
import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import repopt  # noqa: E402
from repopt.integrations.timm import TimmError, create_optimizer_v2, repvgg_name, scales_for  # noqa: E402
from repopt.proofs import build_pair_for, run_proof  # noqa: E402
from repopt.reinit import looks_trained  # noqa: E402
from repopt.targets import declared_branches, target_convs  # noqa: E402

pytestmark = pytest.mark.timm

# name -> (target convs after to_target, branch set of one of them or None where nothing is declared)
MODELS = {
    "resnet18": (17, None),
    "vgg11_bn": (8, None),
    "efficientnet_b0": (17, None),
    "repvgg_a0": (22, ("stages.0.1.conv_kxk.conv", ["3x3", "1x1", "identity"])),
    "mobileone_s0": (43, ("stages.0.2.conv_kxk.0.conv", ["3x3", "3x3_2", "3x3_3", "3x3_4", "1x1", "identity"])),
    "repghostnet_050": (32, ("blocks.2.0.ghost1.cheap_operation.0", ["3x3", "identity"])),
    "fastvit_t8": (10, ("stages.1.downsample.proj.0.large_conv.conv", ["7x7", "3x3"])),
}
REFUSED = {"fastvit_t8": "RepMixer"}  # kept multi-branch with strict=False


def fresh(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def plain(name, model):
    strict = name not in REFUSED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not strict:
            with pytest.raises(repopt.ConversionError, match=REFUSED[name]):
                repopt.to_target(model)
        return repopt.to_target(model, strict=strict)


@pytest.mark.parametrize("name", MODELS)
def test_fresh_model_to_plain_hyper_search_scales_and_repopt_steps(name):
    count, example = MODELS[name]
    model = fresh(name)
    assert looks_trained(model) is None  # zero_init_last, RepVGG's gamma ~ N(0.1, 0.1): still fresh
    target = plain(name, model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    model.eval(), target.eval()
    with torch.no_grad():  # the plain copy computes what the model computes (eval mode)
        a, b = model(x), target(x)
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    names = target_convs(target)
    assert len(names) == count
    if example is not None:
        assert declared_branches(target, example[0]) == example[1]
    hs = repopt.to_hyper_search(target.train())
    opt = torch.optim.SGD(repopt.search.hs_param_groups(hs, 4e-5), lr=0.01, momentum=0.9)
    F.cross_entropy(hs(x), y).backward()
    opt.step()
    scales = repopt.extract_scales(hs)
    assert list(scales) == names
    if example is not None:
        assert sorted(scales[example[0]]) == sorted(example[1])
    opt = repopt.RepOptSGD.from_scales(target, scales, lr=0.01, momentum=0.9, nesterov=True, weight_decay=4e-5)
    assert sum(bs is not None for bs in opt.branch_sets) == count  # strict: every target conv is bound
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(target(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in target.parameters())
    assert looks_trained(target) is not None  # now it has trained: a second from_scales would refuse


@pytest.mark.parametrize("name", [n for n, (_, example) in MODELS.items() if example is not None])
def test_equivalence_on_one_block_of_each_family(name):
    """float64: the CSLA block of this block's branch set (constant scales, one BN) trained by torch's SGD equals the
    plain conv trained by RepOptSGD (its default path: the native kernel where it builds), step by step."""
    conv_name, branches = MODELS[name][1]
    target = plain(name, fresh(name))
    conv = target.get_submodule(conv_name)
    pair = build_pair_for(repopt.ConvGeometry.of(conv), declared_branches(target, conv_name))
    csla = pair[0][0]
    assert csla.branch_names + ["identity"] * (csla.identity is not None) == branches
    result = run_proof("sgd nesterov wd", f"{name} {conv_name}", steps=25, pair=pair)
    assert result.ok, result


def test_timm_optimizer_factory_adapter():
    target = plain("repvgg_a0", fresh("repvgg_a0"))
    scales = repopt.extract_scales(repopt.to_hyper_search(target))
    twin = copy.deepcopy(target)
    torch.manual_seed(1)
    opt = create_optimizer_v2(target, "sgd", scales=scales, lr=0.05, weight_decay=1e-4, momentum=0.9)
    torch.manual_seed(1)
    ref = repopt.RepOptSGD.from_scales(twin, scales, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert type(opt) is repopt.RepOptSGD and sum(bs is not None for bs in opt.branch_sets) == 22
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model, o in ((target, opt), (twin, ref)):
        for _ in range(2):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.step()
    for (n, p), q in zip(target.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    assert type(create_optimizer_v2(twin, "adamw", scales=scales, lr=1e-3, reinit=False)) is repopt.RepOptAdamW
    assert type(create_optimizer_v2(twin, "lion", scales=scales, lr=1e-4, reinit=False)) is repopt.RepOptLion
    with pytest.raises(TimmError, match="'adam' has no RepOpt form"):
        create_optimizer_v2(twin, "adam", scales=scales, reinit=False)
    # timm's name rule: only what follows the last underscore names the optimizer, so its own factory reads
    # "repopt_sgd" as torch's SGD (the reason for the adapter instead of a registration under such a name)
    assert type(timm.optim.create_optimizer_v2(twin, "repopt_sgd", lr=0.1)) is torch.optim.SGD


def test_timm_repvgg_is_repopt_vgg_in_repvgg_mode_and_takes_released_scales(tmp_path):
    from repopt.app.cli import main

    ours = repopt.models.create("repopt_vgg_a0", mode="repvgg", num_classes=10).eval()
    theirs = fresh("repvgg_a0").eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 7_840_778
    theirs.load_state_dict({repvgg_name(k): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    # a file in the released format (keys stageK.i.scale_conv.weight ...), imported for timm's names
    hs = repopt.models.create("repopt_vgg_a0", mode="hs", num_classes=10)
    released = {}
    for conv, entry in repopt.extract_scales(hs).items():
        block = conv.removesuffix(".conv")
        for branch, key in (("3x3", "scale_conv"), ("1x1", "scale_1x1"), ("identity", "scale_identity")):
            if branch in entry:
                released[f"{block}.{key}.weight"] = entry[branch]
    torch.save(released, tmp_path / "A0-scales.pth")
    # the HS initial scales by depth on timm's RepVGG are RepOpt-VGG's own rule
    by_depth = repopt.extract_scales(repopt.to_hyper_search(plain("repvgg_a0", theirs)))
    for conv, entry in repopt.extract_scales(hs).items():
        assert by_depth[repvgg_name(conv)].keys() == entry.keys()
        assert all(torch.allclose(by_depth[repvgg_name(conv)][b], v) for b, v in entry.items()), conv
    out = tmp_path / "a0-timm.safetensors"
    assert main(["scales", "import", str(tmp_path / "A0-scales.pth"), "-o", str(out), "--for", "timm:repvgg_a0"]) == 0
    scales = repopt.load_scales(out)
    assert scales.metadata["arch"] == "timm:repvgg_a0"
    scales.bind(plain("repvgg_a0", theirs), strict=True)
    assert scales_for(repopt.load_scales(tmp_path / "A0-scales.pth"), "timm:repvgg_a0").keys() == scales.keys()


def _cli(*args, timeout=600):
    done = subprocess.run([sys.executable, "-m", "repopt", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_cli_trains_a_timm_model_with_repopt_and_evaluates_it_in_a_new_process(tmp_path):
    out = tmp_path / "run"  # digits at their stored 8x8: a few steps of resnet18 per epoch
    result = json.loads(_cli("train", "--arch", "timm:resnet18", "--method", "repopt", "--epochs", "1",
                             "--hs-epochs", "1", "--image-size", "8", "--batch-size", "256", "--out", str(out),
                             "--quiet", "--json"))
    assert result["arch"] == "timm:resnet18" and result["method"] == "repopt"
    assert (out / "search" / "scales.safetensors").is_file()
    assert repopt.load_scales(out / "search" / "scales.safetensors").metadata["arch"] == "timm:resnet18"
    evaluated = json.loads(_cli("eval", str(out), "--deploy", "--json"))  # rebuilt from its config, BNs folded
    assert evaluated["top1"] == pytest.approx(result["deployed_top1"])


@pytest.mark.parametrize("arch, method, message", [
    ("timm:fastvit_t8", "plain", "RepMixer"),
    ("timm:resnet18", "repvgg", "no re-parameterizable multi-branch blocks"),
    ("timm:no_such_net", "plain", "unknown timm model 'no_such_net'"),
])
def test_cli_refuses_what_it_cannot_build_with_one_sentence(tmp_path, capsys, arch, method, message):
    from repopt.app.cli import main

    assert main(["train", "--arch", arch, "--method", method, "--epochs", "1", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
