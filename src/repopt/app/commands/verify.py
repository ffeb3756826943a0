"""`repopt verify`: run the GR == CSLA proofs on this machine and print the table."""
from __future__ import annotations

import json
import sys

NAME = "verify"
HELP = "Prove on this machine that RepOpt training equals training the explicit multi-branch (CSLA) block."
EXAMPLES = """examples:
  repopt verify               # table of optimizer x branch set: the path each case proved, max relative error
  repopt verify --json        # {"cases": [...], "max_rel_err": worst, "ok": ...}; exit code 0 only if every case
                              # stayed within 1e-10 on the path it names (a compiled case that fell back fails)
  repopt verify --steps 50 --optimizer adamw
  repopt verify --device cuda # on the GPU: the default cases take the Triton kernels there (pip install repopt[triton])
"""


def add_arguments(p) -> None:
    from ...proofs import BRANCH_SETS, OPTIMIZERS

    p.add_argument("--steps", type=int, default=200, help="training steps per case (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), action="append",
                   help="only these optimizer settings (repeatable)")
    p.add_argument("--branches", choices=sorted(BRANCH_SETS), action="append",
                   help="only these branch sets (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..cli import UserError
    from ...proofs import BRANCH_SETS, OPTIMIZERS, TOLERANCE, run_proof, unavailable
    from ..train import resolve_device

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    device = resolve_device(args.device)
    # a case named on the command line must run; the default list leaves out the ones this machine cannot run
    named = args.optimizer or []
    for o in named:
        if unavailable(o, device) is not None:
            raise UserError(f"--optimizer {o!r} cannot run on {device}: {unavailable(o, device)}")
    left_out = {o: unavailable(o, device) for o in OPTIMIZERS if not named and unavailable(o, device)}
    cases = [(o, b) for o in (named or [o for o in OPTIMIZERS if o not in left_out])
             for b in (args.branches or BRANCH_SETS)]
    show_progress = not args.quiet and not args.json and sys.stderr.isatty()
    if show_progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="proofs", unit="case", file=sys.stderr)
    results = [run_proof(o, b, args.steps, args.seed, device=device) for o, b in cases]
    worst = max(r.max_rel_err for r in results)
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"device": str(device), "cases": [r.as_dict() for r in results], "max_rel_err": worst,
                          "tolerance": TOLERANCE, "ok": ok, "left_out": left_out}, indent=2))
    else:
        print(f"{'optimizer':36s} {'branches':24s} {'path':9s} {'steps':>5s} {'max rel err':>12s}")
        for r in results:
            path = "+".join(r.paths)
            why = "" if r.ok else (f"   FAIL: took {path}, not {r.expected_path}" if not r.path_ok else "   FAIL")
            print(f"{r.optimizer:36s} {r.branches:24s} {path:9s} {r.steps:5d} {r.max_rel_err:12.2e}{why}")
        verdict = "exact" if worst <= TOLERANCE else "NOT exact"
        print(f"worst {worst:.2e} (tolerance {TOLERANCE:.0e}): RepOpt training is {verdict} on this machine")
        for o, why in left_out.items():
            print(f"left out: {o} ({why})")
        if not all(r.path_ok for r in results):
            print("some cases did not take the path they name, so that path is not proven here")
    return 0 if ok else 1
