"""`repopt bench`: optimizer-step, training-throughput and memory ratios, measured side by side in one run."""
from __future__ import annotations

import json
import sys

NAME = "bench"
HELP = ("Measure what RepOpt costs over plain SGD and what it saves over RepVGG: optimizer step, training step, "
        "throughput and peak memory ratios, with absolute times, device, torch version and threads.")
EXAMPLES = """examples:
  repopt bench                 # the full suite: RepOpt-VGG-B1 at 32x32, A0 at 224x224, batch 64 (~6 min on 2 cores)
  repopt bench --quick         # the tiny preset, seconds: checks the machinery, not the claim
  repopt bench --json          # {"optimizer_step_ratio": ..., ..., "details": {...}}
  repopt bench --repeats 25    # more rounds for the optimizer step (the default is 15)
  repopt bench --save b.json   # the table on stdout, the JSON in b.json
  repopt bench --device-check --device cuda   # the GPU check of bench/device_check.sh (one JSON, ~8 min on an H200)
  repopt bench --device-check --quick         # the same steps on CPU at toy sizes
"""


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model and batches: seconds, not the claim's settings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--repeats", type=int, default=None, help="rounds of the optimizer-step comparison")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per method for the peak memory (the median is reported; default 3)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--save", metavar="FILE", default=None, help="also write the JSON result to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device-check", action="store_true",
                   help="instead of the suite: proofs on the device, optimizer step vs torch's fused SGD/AdamW, "
                        "images/s, peak memory and max batch of RepOpt-VGG vs RepVGG (A0, B1 at 224; AMP, "
                        "channels_last), AMP overflow on the first step; JSON (repopt/app/bench/device_check.py)")


def run(args) -> int:
    import torch

    from ..._io import check_writable, write_json
    from ..bench import SuiteConfig, format_report, run_suite
    from ..cli import at_least_one
    from ..train import resolve_device

    cfg = SuiteConfig.quick() if args.quick else SuiteConfig()
    if at_least_one(args.repeats, "--repeats") is not None:
        cfg.optimizer_repeats = args.repeats
    if at_least_one(args.memory_repeats, "--memory-repeats") is not None:
        cfg.memory_repeats = args.memory_repeats
    if at_least_one(args.threads, "--threads") is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.device_check:
        from ..bench.device_check import device_check

        if args.save:
            check_writable(args.save)
        result = device_check(device, toy=args.quick)
        if args.save:
            write_json(args.save, result)
        print(json.dumps(result, indent=2, default=str))
        return 0 if result["ok"] else 1
    if args.save:
        check_writable(args.save)  # now, not after minutes of measuring
    show = not args.quiet and not args.json and sys.stderr.isatty()
    result = run_suite(cfg, device, progress=show)
    if args.save:  # written under a temporary name, then renamed: an earlier file is never left half-written
        write_json(args.save, result)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
