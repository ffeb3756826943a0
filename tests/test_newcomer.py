"""What a newcomer meets first (issue 21): a broken command module is an error, the pipeline checks its stages
before the first one, one source of defaults, the kernels built before the clock, the models' metadata."""
import subprocess
import sys

import pytest

from repopt.app import cli
from repopt.app import commands as command_package


@pytest.fixture
def broken_command(tmp_path, monkeypatch):
    """A command module `broken` whose import fails (a missing dependency), listed among the commands."""
    (tmp_path / "broken.py").write_text("import repopt_no_such_dependency  # noqa\n")
    monkeypatch.setattr(command_package, "__path__", [*command_package.__path__, str(tmp_path)])
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "broken"])
    monkeypatch.delitem(sys.modules, "repopt.app.commands.broken", raising=False)
    return "repopt.app.commands.broken"


def test_broken_command_module_fails_loudly(broken_command, capsys):
    assert cli.main(["--help"]) == 1
    err = capsys.readouterr().err
    assert f"the command module {broken_command} failed to import" in err
    assert "repopt_no_such_dependency" in err


def test_broken_command_module_fails_every_command(broken_command, capsys):
    assert cli.main(["train", "--list-archs"]) == 1
    assert broken_command in capsys.readouterr().err


def test_missing_command_module_is_not_skipped(monkeypatch, capsys):
    """The old code skipped a listed command whose own module is missing ("not built yet")."""
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, "not_there"])
    with pytest.raises(cli.CommandImportError, match="repopt.app.commands.not_there"):
        cli.build_parser()


def test_cli_help_of_the_installed_commands():
    out = subprocess.run([sys.executable, "-m", "repopt", "--help"], capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in cli.COMMANDS)


# --- the pipeline checks what every stage needs before the first one (GhostNet has no repvgg form) ---------------

def test_plan_methods_ghostnet_runs_repopt_and_plain_and_says_why():
    from repopt.app.pipeline import plan_methods

    methods, skipped = plan_methods("repopt_ghostnet_0_5x")
    assert methods == ("repopt", "plain")
    assert list(skipped) == ["repvgg"]
    assert "repopt_ghostnet_0_5x has no multi-branch training form" in skipped["repvgg"]
    assert "runs repopt and plain" in skipped["repvgg"]
    assert plan_methods("repopt_vgg_tiny") == (("repopt", "repvgg", "plain"), {})


def _plain_only(monkeypatch):
    """A registered model `plain_only` that builds its target form only."""
    import dataclasses

    from repopt.models import registry

    tiny = registry.model_info("repopt_vgg_tiny")
    monkeypatch.setitem(registry._MODELS, "plain_only", dataclasses.replace(tiny, name="plain_only",
                                                                            modes=("target",)))


def test_plan_methods_refuses_unknown_arch_and_missing_hs_form(monkeypatch):
    from repopt.app.cli import UserError
    from repopt.app.pipeline import plan_methods

    with pytest.raises(UserError, match="unknown model 'repopt_vgg_nope'"):
        plan_methods("repopt_vgg_nope")
    _plain_only(monkeypatch)
    with pytest.raises(UserError, match="plain_only has no hyper-search form"):
        plan_methods("plain_only")
    assert plan_methods("plain_only", searches=False)[0] == ("repopt", "plain")


def test_pipeline_refusal_comes_before_any_stage(tmp_path, monkeypatch):
    from repopt.app import pipeline
    from repopt.app.cli import UserError
    from repopt.app.train import TrainConfig

    _plain_only(monkeypatch)
    started = []
    monkeypatch.setattr(pipeline, "search_scales", lambda *a, **k: started.append("search"))
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: started.append("train"))
    with pytest.raises(UserError):
        pipeline.run_pipeline(TrainConfig(arch="plain_only", out=str(tmp_path / "p"), quiet=True), 1, int8=False)
    assert started == []


def test_ghostnet_pipeline_runs_repopt_and_plain(tmp_path, capsys, one_thread):
    from repopt.app.cli import main

    out = tmp_path / "ghost"
    assert main(["pipeline", "--arch", "repopt_ghostnet_0_5x", "--epochs", "1", "--train-subset", "64",
                 "--no-int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    note = printed.index("has no multi-branch training form")
    assert note < printed.index("[pipeline] hyper-search")  # said before the first stage
    import json

    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["results"]] == ["repopt", "plain"]
    assert "repvgg" in report["skipped_methods"]
    assert "Not run: repopt_ghostnet_0_5x has no multi-branch" in (out / "report.md").read_text()


# --- one source of defaults: TrainConfig's, the pipeline's change in one place, each command says what it uses ---

def _parsed(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_train_search_and_pipeline_default_to_trainconfigs_arch(tmp_path):
    from repopt.app.commands.common import DEFAULTS, config_from_args
    from repopt.app.train import TrainConfig

    assert DEFAULTS["arch"] == TrainConfig().arch == "repopt_vgg_a0"  # the README's demo net
    configs = {c: config_from_args(_parsed(c, "--quiet"), "repopt", str(tmp_path / c))
               for c in ("train", "search", "pipeline")}
    assert {c: cfg.arch for c, cfg in configs.items()} == dict.fromkeys(configs, "repopt_vgg_a0")
    assert {c: cfg.epochs for c, cfg in configs.items()} == {"train": 30, "search": 30, "pipeline": 6}
    for cfg in configs.values():  # everything else is TrainConfig's own
        assert (cfg.dataset, cfg.batch_size, cfg.lr_base_size, cfg.label_smoothing) == \
            (TrainConfig.dataset, TrainConfig.batch_size, TrainConfig.lr_base_size, TrainConfig.label_smoothing)


def test_the_help_shows_trainconfigs_defaults(capsys):
    from repopt.app.train import TrainConfig

    with pytest.raises(SystemExit):
        _parsed("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {TrainConfig.arch};" in text and f"(default {TrainConfig.epochs})" in text
    with pytest.raises(SystemExit):
        _parsed("pipeline", "--help")
    assert "(default 6)" in " ".join(capsys.readouterr().out.split())


def test_the_pipelines_scales_fit_a_train_with_its_defaults(tmp_path):
    """The defect: the pipeline's search was of repopt_vgg_a0, `repopt train` built repopt_vgg_tiny."""
    from repopt.app.commands.common import config_from_args

    pipe = config_from_args(_parsed("pipeline", "--quiet"), "repopt", str(tmp_path / "p"))
    train = config_from_args(_parsed("train", "--quiet", "--scales", "p/search/scales.safetensors"), "repopt",
                             str(tmp_path / "t"))
    assert pipe.arch == train.arch and pipe.model_options == train.model_options


def test_each_command_prints_its_settings_in_one_line(tmp_path, capsys):
    from repopt.app.commands.common import config_from_args

    config_from_args(_parsed("train", "--epochs", "3"), "repopt", str(tmp_path / "t"))
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[train] arch repopt_vgg_a0 (default), dataset digits (default), epochs 3, batch size 64 "
                     f"(default), seed 0 -> {tmp_path / 't'}"]
    config_from_args(_parsed("pipeline", "--arch", "repopt_vgg_tiny"), "repopt", str(tmp_path / "p"))
    assert capsys.readouterr().out.startswith("[pipeline] arch repopt_vgg_tiny, dataset digits (default), epochs 6 "
                                              "(default),")
    config_from_args(_parsed("search", "--quiet"), "hs", str(tmp_path / "s"))
    config_from_args(_parsed("search", "--json"), "hs", str(tmp_path / "s"))
    assert capsys.readouterr().out == ""  # --quiet and --json print nothing else


def test_a_command_default_must_be_a_trainconfig_setting():
    import argparse

    from repopt.app.commands.common import add_training_arguments

    with pytest.raises(ValueError, match="not TrainConfig settings: epoch"):
        add_training_arguments(argparse.ArgumentParser(), "runs/x", defaults={"epoch": 6})


def test_a_recipes_settings_are_not_called_defaults(tmp_path, capsys):
    from repopt.app.commands.common import config_from_args

    config_from_args(_parsed("train", "--recipe", "imagenet-repvgg-b1"), "repopt", str(tmp_path / "t"))
    line = capsys.readouterr().out
    assert line.startswith("[train] arch repopt_vgg_b1, dataset folder, epochs 120, batch size 256, recipe "
                           "imagenet-repvgg-b1"), line


# --- the C kernels are built before the clock starts, and their build is reported apart --------------------------

class _Clock:
    """A fake time.perf_counter: 1 ms per call, and whatever `advance` adds (the build's "1000 s")."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1e-3
        return self.now


@pytest.fixture
def fresh_kernel_cache(monkeypatch, tmp_path):
    """The kernel loader as in a new process on a new machine: nothing loaded, an empty cache (as
    tests/test_kernel_cache.py isolates it)."""
    from repopt.optim import kernel_cache, native

    if native._compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_build_error", None)
    monkeypatch.setattr(kernel_cache, "_said", set())
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(tmp_path / "kernel-cache"))
    monkeypatch.delenv("REPOPT_NATIVE", raising=False)


def test_the_kernel_build_is_before_the_clock_and_reported_apart(tmp_path, monkeypatch, fresh_kernel_cache,
                                                                 one_thread):
    import types

    from repopt import RepOptSGD, extract_scales, save_scales
    from repopt.app import kernels as kernels_module
    from repopt.app import train as train_module
    from repopt.models import create
    from repopt.optim import kernel_cache

    clock, events = _Clock(), []
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(train_module, "time", fake_time)
    monkeypatch.setattr(kernels_module, "time", fake_time)
    real_build, real_step = kernel_cache.build, RepOptSGD.step

    def build(*args, **kwargs):
        events.append("build")
        clock.now += 1000.0  # a build of "1000 s": it must land in kernel_build_seconds, not in train_seconds
        return real_build(*args, **kwargs)

    def step(self, *args, **kwargs):
        events.append("step")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(kernel_cache, "build", build)
    monkeypatch.setattr(RepOptSGD, "step", step)
    scales = save_scales(extract_scales(create("repopt_vgg_tiny", mode="hs", num_classes=10)), tmp_path / "s.safetensors")
    result = train_module.train(train_module.TrainConfig(
        method="repopt", arch="repopt_vgg_tiny", scales=str(scales), epochs=1, image_size=16, batch_size=128,
        train_subset=256, quiet=True, out=str(tmp_path / "run")))
    assert events[0] == "build" and events.count("build") == 1 and events.count("step") == 2  # before step one
    assert result["kernels"] == "native" and result["kernel_build_seconds"] >= 1000.0
    assert result["train_seconds"] < 1.0  # the 1000 s are not in it (and so not in train_images_per_s)
    import json

    assert json.loads((tmp_path / "run" / "result.json").read_text())["kernel_build_seconds"] >= 1000.0


def test_plain_sgd_builds_no_kernels(tmp_path, fresh_kernel_cache, one_thread):
    from repopt.app.train import TrainConfig, train
    from repopt.optim import native

    result = train(TrainConfig(method="plain", arch="repopt_vgg_tiny", epochs=1, image_size=16, batch_size=128,
                               train_subset=256, quiet=True, out=str(tmp_path / "run")))
    assert "kernel_build_seconds" not in result and native._library is None


def test_the_pipeline_report_names_the_build_apart():
    from repopt.app.pipeline import report_markdown

    row = dict(method="repopt", top1=90.0, train_seconds=10.0, train_images_per_s=1000.0, params=1, deployed_top1=90.0)
    report = {"arch": "a", "dataset": "d", "epochs": 1, "hs_epochs": 1, "batch_size": 64, "optimizer": "sgd",
              "seed": 0, "hs_top1": 10.0, "scales": "s", "results": [
                  {**row, "kernel_build_seconds": 12.34, "kernels": "native"}, {**row, "method": "plain"}]}
    text = report_markdown(report)
    assert "repopt: its optimizer's kernels (native) were built or loaded in 12.3 s before training, outside its " \
           "train s and img/s." in text
    assert "plain: its" not in text


# --- model metadata as data: image size, the released scales file, the paper's figure -----------------------------

def test_every_registered_model_has_metadata_and_the_names_are_written_out():
    import re
    from pathlib import Path

    from repopt.models import CONFIGS, list_models
    from repopt.models.registry import model_info

    src = Path(__file__).parents[1] / "src" / "repopt" / "models"
    text = (src / "registry.py").read_text() + (src / "vgg.py").read_text()
    for name in list_models():
        info = model_info(name)
        assert info.name == name and info.image_size in (28, 32, 224) and info.modes and info.description
        assert f'"{name}"' in text, name  # `grep -rn {name} src` finds its definition
        assert name in CONFIGS or name == "repopt_ghostnet_0_5x"
    assert not re.search(r'f"repopt_vgg_\{', text)  # no name built by an f-string any more


def test_the_released_scales_files_named_in_the_registry_fit_their_models():
    from pathlib import Path

    import repopt
    from repopt.models import create, list_models
    from repopt.models.registry import model_info

    released = Path(__file__).parents[2] / "shared" / "official-scales"
    named = {n: model_info(n).scales_file for n in list_models() if model_info(n).scales_file}
    assert named == {"repopt_vgg_b1": "RepOpt-VGG-B1-scales.pth", "repopt_vgg_b2": "RepOpt-VGG-B2-scales.pth",
                     "repopt_vgg_l1": "RepOpt-VGG-L1-scales.pth", "repopt_vgg_l2": "RepOpt-VGG-L2-scales.pth",
                     "repopt_ghostnet_0_5x": "RepOptGhostNet_0_5x_scales.pth"}
    if not released.is_dir():
        pytest.skip("the released scales files are not on this machine")
    import torch

    for name, file in named.items():
        with torch.device("meta"):
            model = create(name, num_classes=1000)
        assert len(repopt.load_scales(released / file).bind(model)) == len(model.target_conv_names())  # strict


def test_paper_figures_only_where_the_paper_states_them():
    from repopt.models import list_models
    from repopt.models.registry import model_info

    figures = {n: model_info(n).paper_top1 for n in list_models() if model_info(n).paper_top1 is not None}
    # FIELD-NOTES.md, the paper's Table 2: RepOpt-VGG at batch 32 on ImageNet
    assert figures == {"repopt_vgg_b1": 78.47, "repopt_vgg_b2": 79.36, "repopt_vgg_l1": 79.46, "repopt_vgg_l2": 80.29}
    assert all(model_info(n).paper_source for n in figures)


def test_list_archs_shows_the_metadata(capsys):
    assert cli.main(["train", "--list-archs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    b1 = next(line for line in lines if line.startswith("repopt_vgg_b1 "))
    assert b1.split()[:5] == ["repopt_vgg_b1", "224", "target,hs,csla,repvgg", "RepOpt-VGG-B1-scales.pth", "78.47%"]
    ghost = next(line for line in lines if line.startswith("repopt_ghostnet_0_5x "))
    assert ghost.split()[2] == "target,hs,csla"
    assert lines[-1].startswith("timm:NAME")

