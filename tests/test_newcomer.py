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
