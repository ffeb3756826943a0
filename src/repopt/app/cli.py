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
    from ..reinit import ReinitError
    from ..scales import ScalesError
    from .train import TrainingError

    # OSError: a missing file, a full disk (repopt._io.WriteError names the file it could not write), an I/O error
    return (UserError, ScalesError, BranchError, ReinitError, CheckpointError, DataError, TrainingError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repopt", description="Gradient re-parameterization (RepOptimizer) for "
                                     "PyTorch: train a plain conv net with the accuracy of a multi-branch one.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"repopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"commands.{name}"):
                continue  # not built yet
            raise
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, epilog=mod.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
