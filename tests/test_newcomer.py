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


def test_plan_methods_refuses_unknown_arch_and_missing_hs_form(monkeypatch):
    from repopt.app.cli import UserError
    from repopt.app.pipeline import plan_methods
    from repopt.models import registry

    with pytest.raises(UserError, match="unknown model 'repopt_vgg_nope'"):
        plan_methods("repopt_vgg_nope")
    monkeypatch.setitem(registry._REGISTRY, "plain_only", registry._REGISTRY["repopt_vgg_tiny"])
    monkeypatch.setitem(registry._MODES, "plain_only", ("target",))
    with pytest.raises(UserError, match="plain_only has no hyper-search form"):
        plan_methods("plain_only")
    assert plan_methods("plain_only", searches=False)[0] == ("repopt", "plain")


def test_pipeline_refusal_comes_before_any_stage(tmp_path, monkeypatch):
    from repopt.app import pipeline
    from repopt.app.cli import UserError
    from repopt.app.train import TrainConfig
    from repopt.models import registry

    monkeypatch.setitem(registry._REGISTRY, "plain_only", registry._REGISTRY["repopt_vgg_tiny"])
    monkeypatch.setitem(registry._MODES, "plain_only", ("target",))
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
