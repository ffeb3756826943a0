"""The Table 4 ablation switches (app/ablations.py): each takes exactly one ingredient of RepOpt away."""
from __future__ import annotations

import pytest
import torch

from repopt import RepOptSGD
from repopt.app.ablations import ones_scales
from repopt.app.cli import main
from repopt.app.train import TrainConfig, TrainingError, build_model, build_optimizer, train
from repopt.models import create

CFG = dict(method="repopt", arch="repopt_vgg_tiny", dataset="digits", image_size=16, batch_size=128, epochs=1,
           quiet=True, num_classes=10, scales="ones")


def _built(**kw):
    cfg = TrainConfig(**{**CFG, **kw}).resolve()
    torch.manual_seed(0)
    model = build_model(cfg)
    return model, build_optimizer(cfg, model, fresh=True)


def _convs(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("conv")}


def test_ones_scales_cover_every_branch_of_every_target():
    model = create("repopt_vgg_tiny", num_classes=10)
    scales = ones_scales(model)
    assert set(scales) == set(model.target_conv_names())
    assert set(scales["stage1.0.conv"]) == {"3x3", "1x1", "identity"}  # 16 -> 16, stride 1: identity too
    assert set(scales["stage0.conv"]) == {"3x3", "1x1"}
    assert all(torch.all(v == 1) for branches in scales.values() for v in branches.values())
    # SGD multiplier of an identity block with all scales 1: 1 everywhere, 1 + 1 at the centre, + 1 on the diagonal
    m = scales.bind(model)["stage1.0.conv"][1].sgd_multiplier()
    assert m[0, 1, 0, 0] == 1 and m[0, 1, 1, 1] == 2 and m[1, 1, 1, 1] == 3 and m[1, 0, 1, 1] == 2


def test_no_reinit_keeps_default_init_and_keeps_the_masks():
    plain_model, _ = _built(method="plain", scales=None)
    ablated, opt = _built(reinit=False)
    full, _ = _built()
    for name, w in _convs(ablated).items():
        assert torch.equal(w, _convs(plain_model)[name]), name  # the default init, untouched
    assert not torch.equal(_convs(full)["stage1.0.conv"], _convs(ablated)["stage1.0.conv"])
    assert isinstance(opt, RepOptSGD) and sum(m is not None for m in opt.branch_sets) == 7


def test_no_mask_applies_the_rule_and_trains_with_plain_sgd():
    ablated, opt = _built(mask=False)
    full, _ = _built()
    for name, w in _convs(ablated).items():
        assert torch.equal(w, _convs(full)[name]), name  # the same rule of initialization, same draws
    assert type(opt) is torch.optim.SGD  # no multiplier anywhere


def test_refusals_and_description(tmp_path, capsys):
    with pytest.raises(TrainingError, match="need --method repopt"):
        TrainConfig(**{**CFG, "method": "plain", "reinit": False}).validate()
    with pytest.raises(TrainingError, match="that is plain training"):
        TrainConfig(**{**CFG, "reinit": False, "mask": False}).validate()
    text = TrainConfig(**{**CFG, "mask": False}).resolve().describe()
    assert text.endswith("(ablation: no gradient multipliers, all scales 1)")
    assert main(["train", "--method", "plain", "--no-mask", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "need --method repopt" in capsys.readouterr().err


def test_resume_refuses_another_ablation(tmp_path):
    cfg = {**CFG, "out": str(tmp_path), "epochs": 1}
    cfg.pop("num_classes")
    train(TrainConfig(**{**cfg, "mask": False}))
    with pytest.raises(ValueError, match="mask"):
        train(TrainConfig(**{**cfg, "epochs": 1}))


def test_pipeline_with_given_scales_skips_the_search(tmp_path):
    out = tmp_path / "p"
    assert main(["pipeline", "--arch", "repopt_vgg_tiny", "--scales", "ones", "--no-reinit", "--epochs", "1",
                 "--batch-size", "128",
                 "--no-int8", "--quiet", "--out", str(out)]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["hs_top1"] is None and report["scales"] == "ones" and not (out / "search").exists()
    from repopt.app.checkpoint import load_checkpoint

    assert load_checkpoint(out / "repopt" / "checkpoint.pt")["config"]["reinit"] is False
    assert load_checkpoint(out / "plain" / "checkpoint.pt")["config"]["reinit"] is True  # repopt row only


@pytest.mark.parametrize("command", ["train", "pipeline"])
@pytest.mark.parametrize("flag", ["--no-reinit", "--no-mask"])
def test_the_search_before_an_ablation_is_a_plain_search(command, flag, tmp_path, monkeypatch):
    """Without --scales the hyper-search runs first; the ablation is of the RepOpt run, not of its search (which
    refused it: 'need --method repopt')."""
    import repopt.app.pipeline as pipeline
    import repopt.app.runs as runs

    started = []

    def validated(cfg):  # the trainer's checks, without the training
        cfg.validate()
        started.append(cfg)
        if cfg.method != "hs":
            raise KeyboardInterrupt  # the command exits 130
        return {"top1": 0.0}

    monkeypatch.setattr(runs, "train", validated)
    monkeypatch.setattr(pipeline, "train", validated)
    assert main([command, flag, "--arch", "repopt_vgg_tiny", "--quiet", "--out", str(tmp_path)]) == 130
    hs, repopt = started
    assert (hs.method, hs.reinit, hs.mask) == ("hs", True, True)
    assert repopt.method == "repopt" and (repopt.reinit, repopt.mask) == (flag != "--no-reinit", flag != "--no-mask")
