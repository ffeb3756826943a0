"""RepOptSGD's native CPU step against torch's fused SGD on the same model, gradients and flags, side by side.

The figure `repopt bench` reports as optimizer_step_ratio, alone (seconds, not the suite's minutes), with what the
step is made of: every round times, back to back,

    torch SGD      torch.optim.SGD(fused=True) on the plain target model (the baseline)
    RepOptSGD      RepOptSGD's step (native path): the Python that picks paths and binds jobs, torch's fused SGD on
                   the weights without a multiplier, and one native call for the target weights
    kernel alone   native.sgd_step on the already bound jobs of RepOptSGD's target weights (the C kernel and the
                   launch, without the rest of step())

and each ratio is the median over rounds of that round's ratio to torch SGD (outside load that hits one round
cancels out of its ratio). --passes repeats the whole measurement and reports the median of the passes' ratios.

    python bench/native_sgd_step.py [--arch repopt_vgg_b1] [--repeats 15] [--passes 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from repopt.app.bench.optimizer import _same_gradients
from repopt.app.bench.timing import environment, interleaved, paired_ratio, summary
from repopt.app.bench.workloads import SGD_FLAGS, bench_scales, build
from repopt.optim import native


def kernel_alone(opt):
    """native.sgd_step on opt's target weights, bound as opt's own native path binds them (not a first step)."""
    group = opt.param_groups[0]
    jobs, tensors = [], []
    for i, p in enumerate(group["params"]):
        cached = opt._native_jobs.get(p)
        if opt.multiplier_of(0, i) is None or cached is None or cached[1] is None:
            continue
        job, table = cached[1]
        buf = opt.state[p]["momentum_buffer"]
        jobs.append(native.bind(job, p, p.grad, buf, False))
        tensors += [p, p.grad, buf, table]
    if len(jobs) != opt.last_step_paths["native"]:
        raise SystemExit(f"the first parameter group holds {len(jobs)} of the {opt.last_step_paths['native']} native "
                         f"target weights; 'kernel alone' would time only those")
    return lambda: native.sgd_step(jobs, group, p.dtype, tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="repopt_vgg_b1")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15, help="rounds per pass")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"the native kernel is unavailable here: {native.build_error() or 'REPOPT_NATIVE is off'}")

    flags = dict(SGD_FLAGS)
    plain, opt_plain = build("plain", args.arch, args.num_classes, sgd_flags=flags)
    rep, opt_rep = build("repopt", args.arch, args.num_classes, scales=bench_scales(args.arch, args.num_classes),
                         sgd_flags=flags)
    _same_gradients([plain, rep])
    opt_plain.step()
    opt_rep.step()  # momentum buffers and prepared jobs exist from here on
    if opt_rep.last_path != "native":
        raise SystemExit(f"RepOptSGD's target weights did not all take the native path ({opt_rep.last_path})")
    variants = {"torch SGD": opt_plain.step, "RepOptSGD": opt_rep.step, "kernel alone": kernel_alone(opt_rep)}
    passes = []
    for _ in range(args.passes):
        times = interleaved(variants, args.repeats, warmup=2)
        passes.append({k: {**summary(v), "ratio_vs_torch_sgd": paired_ratio(v, times["torch SGD"])}
                       for k, v in times.items()})
    ratios = {k: statistics.median(p[k]["ratio_vs_torch_sgd"] for p in passes) for k in variants}
    result = {"environment": environment(torch.device("cpu")), "arch": args.arch, "flags": flags,
              "path": opt_rep.last_step_paths, "passes": passes, "median_ratio_vs_torch_sgd": ratios}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return
    env = result["environment"]
    print(f"{args.arch}, {env['device']}, torch {env['torch']}, {env['threads']} threads, "
          f"load {env['load_average_1min']}; {args.passes} passes of {args.repeats} interleaved rounds")
    print(f"{'variant':14s} {'median ms per pass':>28s}  {'ratio per pass':>22s}  {'median ratio':>12s}")
    for k in variants:
        ms = " ".join(f"{1e3 * p[k]['median_s']:6.1f}" for p in passes)
        rs = " ".join(f"{p[k]['ratio_vs_torch_sgd']:.3f}" for p in passes)
        print(f"{k:14s} {ms:>28s}  {rs:>22s}  {ratios[k]:12.3f}")


if __name__ == "__main__":
    main()
