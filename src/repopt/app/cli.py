"""The `repopt` command. Each subcommand lives in repopt/app/commands/<name>.py and exposes

    NAME, HELP, EXAMPLES          strings
    add_arguments(parser)         fills its argparse parser
    run(args) -> int              does the work; returns the exit code

Bad input raises repopt.app.cli.UserError (or a known library error) and becomes one sentence on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ["pipeline", "search", "train", "eval", "quantize", "analyze", "export", "scales", "verify", "bench"]


class UserError(Exception):
    """Bad input from the user: printed as one sentence, exit code 2."""


def at_least_one(value: int | None, flag: str) -> int | None:
    """`value` of a count option (None: not given), refused below 1."""
    if value is not None and value < 1:
        raise UserError(f"{flag} must be at least 1, got {value}")
    return value


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..branches import BranchError
    from .checkpoint import CheckpointError
    from ..data import DataError
    from ..pretrained import InitError
    from ..reinit import ReinitError
    from ..scales import ScalesError
    from .train import TrainingError

    # OSError: a missing file, a full disk (repopt._io.WriteError names the file it could not write), an I/O error
    return (UserError, ScalesError, BranchError, ReinitError, CheckpointError, DataError, TrainingError, InitError,
            OSError)


class CommandImportError(ImportError):
    """A command module of COMMANDS failed to import: the installation is broken, never a command to hide."""


def _import_command(name: str):
    module = f"{__package__}.commands.{name}"
    try:
        return importlib.import_module(module)
    except Exception as e:  # an import error, but also a SyntaxError or an error raised at import time
        raise CommandImportError(f"the command module {module} failed to import ({type(e).__name__}: {e}); every "
                                 f"command of `repopt` needs it, so the installation is broken") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repopt", description="Gradient re-parameterization (RepOptimizer) for "
                                     "PyTorch: train a plain conv net with the accuracy of a multi-branch one.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"repopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _import_command(name)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, epilog=mod.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandImportError as e:
        import traceback

        traceback.print_exception(e.__cause__, file=sys.stderr)  # where in the module it broke
        print(f"repopt: error: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # `repopt ... | head`: the reader left, nothing is wrong (before OSError: it is one)
        sys.stdout = open(os.devnull, "w")
        return 0
    except _known_errors() as e:
        print(f"repopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"repopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
