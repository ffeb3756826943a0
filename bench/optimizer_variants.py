"""Which way of applying the SGD multiplier is fastest here? Times, interleaved on the same gradients:

    torch SGD            torch.optim.SGD, the baseline (same flags)
    native               RepOptSGD's default CPU path: the C kernel, multiply inside the update (when it builds)
    scratch N            RepOptSGD(native=False) writing M * G block by block into an N-byte scratch (the eager path)
    whole tensors        RepOptSGD(native=False, scratch_bytes=0): M * G as one full-size temporary per weight
    grad in place        p.grad *= M in place, then torch SGD (changes what the user sees in p.grad)
    first version        repopt's first RepOptSGD: a full-size M * G per weight (table broadcast), all alive at once
    compiled             RepOptSGD(compiled=True): multiply and SGD update in one compiled kernel per weight
                         (--compile; the compile time of its first step is shown)

    python bench/optimizer_variants.py [--arch repopt_vgg_b1] [--repeats 15] [--fused/--no-fused] [--compile]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from repopt.app.bench.optimizer import _same_gradients
from repopt.app.bench.timing import environment, interleaved, paired_ratio, summary
from repopt.app.bench.workloads import SGD_FLAGS, bench_scales, build
from repopt.branches import diagonal_taps
from repopt.optim import native


def in_place_step(opt, plain_opt):
    """p.grad <- M * p.grad in place, then torch's SGD on the multiplied p.grad."""
    def step():
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, mult in zip(params, opt.branch_sets):
            if mult is None:
                continue
            mult.multiply_rows(p.grad, 0, p.grad)
        plain_opt.step()
    return step


def first_version_step(opt, plain_opt):
    """repopt's first RepOptSGD: every M * G a new full-size tensor (the (C_out, 1, kh, kw) table broadcast over the
    input channels, then the diagonal), all of them alive at once, then one torch SGD call."""
    from torch.optim.sgd import sgd

    def step():
        group = opt.param_groups[0]
        params, grads, bufs = [], [], []
        twins = [q for g in plain_opt.param_groups for q in g["params"]]  # same order: same param groups
        for p, q, mult in zip([p for g in opt.param_groups for p in g["params"]], twins, opt.branch_sets):
            grad = p.grad
            if mult is not None:
                grad = p.grad * mult.tap_table(2, grad.device, grad.dtype)
                if mult.has_identity:
                    diagonal_taps(grad, mult.geometry).add_(diagonal_taps(p.grad, mult.geometry))
            params.append(p)
            grads.append(grad)
            bufs.append(plain_opt.state[q]["momentum_buffer"])
        sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=False, fused=group["fused"])
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
    if native.available():
        m, o = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
        models.append(m)
        variants["native"] = o.step
    sizes = [int(s) for s in args.scratch.split(",") if s]
    for size in sizes + [0]:
        m, o = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
        o.scratch_bytes, o.native = size, False
        models.append(m)
        variants[f"scratch {size >> 10} KiB" if size else "whole tensors"] = o.step
    m, o = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
    m2, o2 = build("plain", args.arch, args.num_classes, sgd_flags=flags)
    for p, q in zip(m.parameters(), m2.parameters()):
        q.data = p.data  # the in-place variant updates m's weights through a plain torch SGD
    models += [m]
    variants["grad in place"] = in_place_step(o, o2)
    m3, o3 = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
    m4, o4 = build("plain", args.arch, args.num_classes, sgd_flags=flags)
    for p, q in zip(m3.parameters(), m4.parameters()):
        q.data = p.data  # o4 only holds the momentum buffers of m3's weights
    models += [m3]
    variants["first version"] = first_version_step(o3, o4)
    compile_s = None
    if args.compile:
        mc, oc = build("repopt", args.arch, args.num_classes, scales=scales, sgd_flags=flags)
        oc.native = False
        models.append(mc)
    _same_gradients(models)
    for a, b in ((m, m2), (m3, m4)):
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = p.grad
    o4.step()  # creates the momentum buffers the first version updates
    if args.compile:
        oc.compiled = True
        oc.step()  # creates the momentum buffers (eager)
        t0 = time.perf_counter()
        oc.step()  # compiles
        compile_s = time.perf_counter() - t0
        variants["compiled"] = oc.step
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
