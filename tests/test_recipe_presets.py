"""`--recipe NAME`: the paper's ImageNet and hyper-search recipes as presets; explicit flags override them, the run
prints the recipe in full with its overrides and records both in its config."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from repopt.app.cli import build_parser, main
from repopt.app.commands.common import config_from_args
from repopt.app.recipes import PRESETS, describe_preset, merge_preset
from repopt.app.train import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))


def cfg_of(*argv: str) -> TrainConfig:
    args = build_parser().parse_args(["train", *argv])
    return config_from_args(args, "repopt", args.out)


def test_the_imagenet_presets_are_the_papers_recipe():
    for size in ("b1", "b2", "l1", "l2"):
        repopt, repvgg = PRESETS[f"imagenet-repopt-vgg-{size}"], PRESETS[f"imagenet-repvgg-{size}"]
        assert repopt["arch"] == repvgg["arch"] == f"repopt_vgg_{size}"
        assert (repopt["method"], repvgg["method"]) == ("repopt", "repvgg")
        assert {k: v for k, v in repopt.items() if k != "method"} == {k: v for k, v in repvgg.items() if k != "method"}
    b1 = PRESETS["imagenet-repopt-vgg-b1"]
    assert (b1["epochs"], b1["batch_size"], b1["lr_base"], b1["lr_base_size"], b1["weight_decay"]) == \
        (120, 256, 0.1, 256, 4e-5)
    assert (b1["warmup_epochs"], b1["momentum"], b1["nesterov"], b1["label_smoothing"], b1["grad_clip"]) == \
        (5.0, 0.9, True, 0.1, None)
    assert b1["image_size"] == 224 and b1["data_options"] == {"loader": "stream", "augment": "raug15"}
    hs = PRESETS["cifar100-hs-b1"]
    assert (hs["method"], hs["dataset"], hs["epochs"], hs["batch_size"], hs["lr_base"], hs["weight_decay"]) == \
        ("hs", "cifar100", 240, 256, 0.1, 4e-5)
    assert (hs["warmup_epochs"], hs["label_smoothing"], hs["grad_clip"], hs["image_size"]) == (5.0, 0.0, 5.0, 32)


def test_explicit_flags_override_the_preset_and_are_listed():
    cfg = cfg_of("--recipe", "imagenet-repopt-vgg-b1", "--data-dir", "/imagenet", "--epochs", "2",
                 "--workers", "3", "--augment", "rrc-flip").resolve()
    assert (cfg.method, cfg.arch, cfg.dataset, cfg.image_size, cfg.epochs, cfg.batch_size) == \
        ("repopt", "repopt_vgg_b1", "folder", 224, 2, 256)
    assert cfg.lr == pytest.approx(0.1) and cfg.warmup_epochs == 5.0 and cfg.label_smoothing == 0.1
    assert cfg.data_options == {"loader": "stream", "augment": "rrc-flip", "workers": 3}
    assert cfg.recipe == "imagenet-repopt-vgg-b1" and cfg.recipe_overrides == ["data_options.augment", "epochs"]
    # the learning rate follows the global batch given on the command line, as in the reference code
    assert cfg_of("--recipe", "imagenet-repvgg-b1", "--batch-size", "64").resolve().lr == pytest.approx(0.025)
    assert cfg_of("--recipe", "imagenet-repvgg-b1", "--method", "plain").method == "plain"
    # a flag given with the preset's own value is not an override; without a recipe the built-in defaults hold
    assert cfg_of("--recipe", "imagenet-repvgg-b1", "--epochs", "120").recipe_overrides == []
    plain = cfg_of()
    assert (plain.method, plain.arch, plain.epochs, plain.batch_size, plain.recipe) == \
        ("repopt", "repopt_vgg_a0", 30, 64, None)
    with pytest.raises(SystemExit):
        cfg_of("--recipe", "imagenet-resnet50")


def test_the_printed_recipe_shows_every_value_and_the_overrides():
    settings, overridden = merge_preset("imagenet-repopt-vgg-l2", {"epochs": 3, "data_options": {"workers": 2}})
    assert overridden == {"epochs": (120, 3)} and settings["data_options"]["workers"] == 2
    text = describe_preset("imagenet-repopt-vgg-l2", settings, list(overridden))
    for line in ("epochs = 3   (given on the command line; the recipe has 120)", "lr_base = 0.1",
                 "weight_decay = 4e-05", "label_smoothing = 0.1", "data_options.augment = 'raug15'",
                 "arch = 'repopt_vgg_l2'"):
        assert line in text, line


def test_a_recipe_run_prints_and_records_it(tmp_path, capsys):
    from formats import write_cifar

    from repopt.app.checkpoint import load_checkpoint

    write_cifar(tmp_path / "data", "cifar100", style=2, per_file=40)
    out = tmp_path / "run"
    code = main(["search", "--recipe", "cifar100-hs-b1", "--data-dir", str(tmp_path / "data"), "--arch",
                 "repopt_vgg_tiny", "--epochs", "1", "--batch-size", "20", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "recipe cifar100-hs-b1" in printed and "grad_clip = 5.0" in printed and \
        "arch = 'repopt_vgg_tiny'   (given on the command line; the recipe has 'repopt_vgg_b1')" in printed
    config = load_checkpoint(out / "checkpoint.pt")["config"]
    assert config["recipe"] == "cifar100-hs-b1" and config["recipe_overrides"] == ["arch", "batch_size", "epochs"]
    assert (config["grad_clip"], config["label_smoothing"], config["warmup_epochs"]) == (5.0, 0.0, 5.0)
