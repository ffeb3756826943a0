"""Which way of applying the SGD multiplier is fastest here? Times, interleaved on the same gradients:

    torch SGD            torch.optim.SGD, the baseline (same flags)
    scratch N            RepOptSGD writing M * G block by block into an N-byte scratch (its default path)
    whole tensors        RepOptSGD with scratch_bytes=0: M * G as one full-size temporary per weight
    grad in place        p.grad *= M in place, then torch SGD (changes what the user sees in p.grad)
    compiled             torch.compile of one fused multiply+SGD update per weight (--compile; compile time shown)

    python bench/optimizer_variants.py [--arch repopt_vgg_b1] [--repeats 15] [--fused/--no-fused] [--compile]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from repopt.bench.optimizer import _same_gradients
from repopt.bench.timing import environment, interleaved, paired_ratio, summary
from repopt.bench.workloads import SGD_FLAGS, bench_scales, build


def in_place_step(opt, plain_opt):
    """p.grad <- M * p.grad in place, then torch's SGD on the multiplied p.grad."""
    def step():
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, mult in zip(params, opt.branch_sets):
            if mult is None:
                continue
            g = p.grad
            full, parts = mult._split_terms(2, g.device, g.dtype)
            saved = [(ys, xs, v, g[:, :, ys, xs].clone()) for ys, xs, v in parts]
            diag = mult._diagonal_rows(g, 0).clone() if mult.has_identity else None
            g.mul_(full)
            for ys, xs, v, taps in saved:
                g[:, :, ys, xs].addcmul_(taps, v)
            if diag is not None:
                mult._diagonal_rows(g, 0).add_(diag)
        plain_opt.step()
    return step


def compiled_step(opt, flags):
    """One compiled function per weight shape: multiply by M (table + identity mask) and the SGD update fused."""
    lr, wd, mom = flags["lr"], flags["weight_decay"], flags["momentum"]

    def update(p, g, buf, table, eye):
        d = g * (table + eye) + wd * p
        buf.mul_(mom).add_(d)
        p.sub_(lr * (d + mom * buf))

    fn = torch.compile(update, fullgraph=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    work = []
    for p, mult in zip(params, opt.branch_sets):
        table = mult.tap_table(2, p.device, p.dtype) if mult is not None else torch.ones(1, dtype=p.dtype)
        eye = torch.zeros(1, dtype=p.dtype)
        if mult is not None and mult.has_identity:
            eye = torch.zeros_like(p)
            mult._diagonal_rows(eye, 0).fill_(1)  # a full-size mask: fine for timing, not what repopt keeps
        work.append((p, table, eye))

    def step():
        for p, table, eye in work:
            fn(p, p.grad, opt.state[p]["momentum_buffer"], table, eye)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="repopt_vgg_b1")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--scratch", default="262144,1048576,4194304,16777216", help="scratch sizes in bytes")
    ap.add_argument("--no-fused", action="store_true", help="torch's default per-tensor path instead of fused")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd fused update")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    flags = dict(SGD_FLAGS, fused=not args.no_fused)
    scales = bench_scales(args.arch, args.num_classes)
    plain, opt_plain = build("plain", args.arch, args.num_classes, sgd_flags=flags)
    models, variants = [plain], {"torch SGD": opt_plain.step}
    sizes = [int(s) for s in args.scratch.split(",") if s]
    for size in sizes + [0]:
        m, o = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
        o.scratch_bytes = size
        models.append(m)
        variants[f"scratch {size >> 10} KiB" if size else "whole tensors"] = o.step
    m, o = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
    m2, o2 = build("plain", args.arch, args.num_classes, sgd_flags=flags)
    for p, q in zip(m.parameters(), m2.parameters()):
        q.data = p.data  # the in-place variant updates m's weights through a plain torch SGD
    models += [m]
    variants["grad in place"] = in_place_step(o, o2)
    compile_s = None
    if args.compile:
        mc, oc = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
        models.append(mc)
    _same_gradients(models)
    for p, q in zip(m.parameters(), m2.parameters()):
        q.grad = p.grad
    if args.compile:
        oc.step()  # creates the momentum buffers
        t0 = time.perf_counter()
        step = compiled_step(oc, flags)
        step()
        compile_s = time.perf_counter() - t0
        variants["compiled"] = step
    times = interleaved(variants, args.repeats, warmup=2)
    base = times["torch SGD"]
    rows = {k: {**summary(v), "ratio_vs_torch_sgd": paired_ratio(v, base)} for k, v in times.items()}
    result = {"environment": environment(torch.device("cpu")), "arch": args.arch, "flags": flags,
              "variants": rows, "compile_seconds": compile_s}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    env = result["environment"]
    print(f"{args.arch}, {env['device']}, torch {env['torch']}, {env['threads']} threads, fused={flags['fused']}")
    print(f"{'variant':18s} {'median ms':>10s} {'min ms':>8s} {'ratio':>6s}")
    for k, r in rows.items():
        print(f"{k:18s} {1e3 * r['median_s']:10.1f} {1e3 * r['min_s']:8.1f} {r['ratio_vs_torch_sgd']:6.2f}")
    if compile_s is not None:
        print(f"compile + first step of the compiled variant: {compile_s:.1f} s")


if __name__ == "__main__":
    main()
