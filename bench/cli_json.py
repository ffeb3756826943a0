"""What the table scripts in bench/ share: run a `repopt` command in this process and read its --json output."""
from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys


def repopt_json(argv: list[str]) -> dict:
    """Run `repopt ARGV --json` in this process (the command is echoed on stderr) and return what it printed."""
    from repopt.app.cli import main

    print("$ repopt " + shlex.join(argv + ["--json"]), file=sys.stderr, flush=True)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv + ["--json"])
    if code != 0:
        raise SystemExit(f"repopt {argv[0]} exited with {code}")
    return json.loads(buf.getvalue())
