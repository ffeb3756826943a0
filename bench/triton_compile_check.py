"""Compile every launch configuration of the Triton kernels ahead of time for sm_80 and sm_90 (no GPU needed) and
check the code; CI runs it (.ci/run). Exit 1 on any compile error or contractible float operation.

    python bench/triton_compile_check.py [--arch 80,90] [--jobs 2] [--sweep]

Configurations: every optimizer, every flag combination its param groups accept, float32/float64/float16/bfloat16
weights, weight sizes that give the int32 and the INDEX64 variant and the vectorised and scalar ones, mapped through
the launcher's own triton_kernels._variant (the flags are run-time values: many combinations share one variant).
Each variant is compiled by triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) with the options the
launcher passes (enable_fp_fusion=False) and the wheel's ptxas; TRITON_INTERPRET is removed first.

Checks and figures, per kernel and arch:
  - the PTX holds no float add/sub/mul without an explicit rounding modifier (ptxas may contract those into FMAs,
    and then the GPU's bits differ from the C kernels'), no mad, no approximate division or square root, and no
    integer division or remainder (the index arithmetic multiplies by per-weight constants instead);
  - registers, local memory (spills) and stack, from `cuobjdump -res-usage` on the cubin;
  - instructions per element from the SASS (`nvdisasm -gi`): each instruction is attributed to its source line in
    triton_jit.py, and a configuration runs the instructions outside its flags' branches that are off (sgd: plain,
    momentum, nesterov with weight decay, and with GradScaler's scale; adamw: default, amsgrad), divided by the
    elements per thread (BLOCK / (32 num_warps)); the subroutines of division and sqrt (taken only for denormal or
    extreme operands) are left out; AdamW's loop over the branches is reported per branch.
--sweep compiles the heaviest variants at other (BLOCK, num_warps) and prints the table CONFIG was chosen from.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from repopt.optim import triton_kernels  # noqa: E402

KINDS = ("sgd", "adamw", "lion")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# weight sizes: a multiple of every vector width, an odd one (scalar loads), one of 2^31 elements (INDEX64)
SIZES = ([4096], [4095], [2 ** 31])
FLOAT = r"(?:f16|f16x2|bf16|bf16x2|f32|f64)"
CONTRACTIBLE = re.compile(rf"^\s*(?:@!?%p\d+\s+)?((add|sub|mul|mad)((?:\.\w+)*)\.{FLOAT})\s", re.M)
APPROX = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:div|sqrt|rcp|rsqrt)\.(?:approx|full)\.\S+)", re.M)
INTEGER_DIVISION = re.compile(r"^\s*(?:@!?%p\d+\s+)?((?:div|rem)\.[su](?:16|32|64))\s", re.M)
ROUNDING = {".rn", ".rz", ".rm", ".rp"}
# the named paths a configuration takes through the run-time flags (source text of the `if` tests in triton_jit.py);
# "scale": GradScaler's, a power of two
PATHS = {
    "sgd": {"plain": {}, "momentum": {"mom != 0": True},
            "nesterov+wd": {"mom != 0": True, "wd != 0": True, "tl.load(hyper_ptr + 4) != 0": True},
            "nesterov+wd+scale": {"mom != 0": True, "wd != 0": True, "tl.load(hyper_ptr + 4) != 0": True,
                                  "scale != 1": True, "power_of_two": True}},
    "adamw": {"default": {}, "amsgrad": {"tl.load(hyper_ptr + 7) != 0": True},
              "amsgrad+scale": {"tl.load(hyper_ptr + 7) != 0": True, "scale != 1": True, "power_of_two": True}},
    "lion": {"wd": {"tl.load(hyper_ptr + 6) != 0": True}, "wd+maximize": {"tl.load(hyper_ptr + 6) != 0": True,
                                                                          "tl.load(hyper_ptr + 7) != 0": True}},
}
# flags every path takes as they are in the common case: the kernel's AMP skip not taken, a later step, lerp weight
# below 0.5 (beta1 > 0.5)
DEFAULTS = {"tl.load(inf_ptr) == 0": True, "tl.load(base + 12) != 0": False, "w < 0.5": True}


def groups(kind: str):
    """Every flag combination of a param group that the optimizer accepts (torch refuses nesterov without momentum
    or with dampening)."""
    if kind == "sgd":
        for wd, mom, nesterov, damp, maximize in itertools.product((0, 1e-4), (0, 0.9), (False, True), (0, 0.1),
                                                                    (False, True)):
            if not nesterov or (mom and not damp):
                yield dict(weight_decay=wd, momentum=mom, nesterov=nesterov, dampening=damp, maximize=maximize)
    elif kind == "adamw":
        for amsgrad, maximize in itertools.product((False, True), (False, True)):
            yield dict(amsgrad=amsgrad, maximize=maximize, weight_decay=1e-2)
    else:
        for wd, maximize in itertools.product((0, 1e-2), (False, True)):
            yield dict(weight_decay=wd, maximize=maximize)


def variants() -> tuple[dict, int]:
    """{(kind, dtype, variant items): variant} over every configuration, and how many configurations mapped."""
    out, n = {}, 0
    for kind in KINDS:
        for group, dtype, numels in itertools.product(list(groups(kind)), DTYPES, SIZES):
            variant = triton_kernels._variant(kind, dtype, numels)
            out[(kind, str(dtype), tuple((k, str(v)) for k, v in variant.items()))] = (kind, dtype, variant)
            n += 1
    return out, n


def ptx_problems(ptx: str) -> list[str]:
    """One line per distinct operation of the PTX that ptxas may contract (float add/sub/mul without a rounding
    modifier, mad), that is not correctly rounded (approximate division, sqrt, reciprocal), or that divides integers
    (a routine of ~180 instructions for 64-bit operands)."""
    found = {}
    for m in CONTRACTIBLE.finditer(ptx):
        if m.group(2) == "mad" or not ROUNDING & set(re.findall(r"\.\w+", m.group(3) or "")):
            found.setdefault(f"contractible float operation in the PTX: {m.group(1)}", 0)
    for m in APPROX.finditer(ptx):
        found.setdefault(f"approximate operation in the PTX: {m.group(1)}", 0)
    for m in INTEGER_DIVISION.finditer(ptx):  # the index arithmetic divides by multiply-high (triton_kernels.magic)
        found.setdefault(f"integer division in the PTX: {m.group(1)}", 0)
    return list(found)


# ---- one compile (in a worker process) -----------------------------------------------------------------------------
def _tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else None


def _signature(kind: str, dtype: torch.dtype, variant: dict) -> tuple:
    from repopt.optim import triton_jit

    kernel = dict(zip(KINDS, triton_jit.kernels()))[kind]
    tl_of = {torch.float32: "fp32", torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
    compute = triton_kernels._table_dtype(dtype)
    pointers = [torch.int64, torch.int64 if variant["INDEX64"] else torch.int32] + [
        compute if t == "compute" else t for t in triton_kernels._POINTERS[kind]]
    names = kernel.arg_names
    constexprs = {k: v for k, v in variant.items() if k in names}
    signature = {name: "*" + tl_of[t] for name, t in zip(names, pointers)}
    signature.update({k: "constexpr" for k in constexprs})
    options = {k: v for k, v in variant.items() if k not in names}
    return kernel, signature, constexprs, options


def compile_one(job: tuple) -> dict:
    kind, dtype, variant, arch, workdir, _ = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = dict(kind=kind, dtype=str(dtype).replace("torch.", ""), arch=arch, block=variant["BLOCK"],
               warps=variant["num_warps"], index64=variant["INDEX64"], vec=variant["VEC"], errors=[])
    kernel, signature, constexprs, options = _signature(kind, dtype, variant)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:
        out["errors"].append(f"compile error: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
        return out
    out["seconds"] = round(time.perf_counter() - start, 2)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    out["errors"] += ptx_problems(ptx)
    out["ptx_ops"] = sorted(set(re.findall(rf"^\s*(?:@!?%p\d+\s+)?((?:add|sub|mul|fma|div|sqrt)\.\S*{FLOAT})\s", ptx,
                                           re.M)))
    path = Path(workdir) / f"{kind}_{out['dtype']}_{arch}_{variant['INDEX64']}_{variant['VEC']}_{variant['BLOCK']}" \
                           f"_{variant['num_warps']}.cubin"
    path.write_bytes(cubin)
    objdump, disasm = _tool("cuobjdump"), _tool("nvdisasm")
    if objdump:
        usage = subprocess.run([objdump, "-res-usage", str(path)], capture_output=True, text=True).stdout
        for field in ("REG", "STACK", "LOCAL"):
            m = re.search(rf"\b{field}:(\d+)", usage)
            out[field.lower()] = int(m.group(1)) if m else None
    if disasm:
        sass = subprocess.run([disasm, "-gi", "-c", str(path)], capture_output=True, text=True).stdout
        out["paths"] = path_counts(kind, sass, variant)
    else:  # no SASS tools in this wheel: PTX instruction counts, labelled as such
        out["ptx_instructions"] = len(re.findall(r"^\s+(?:@!?%p\d+\s+)?[a-z][\w.]*\s", ptx, re.M))
    return out


# ---- instructions per element from the SASS ------------------------------------------------------------------------
def _regions() -> tuple[list[tuple[int, int, str, bool]], set[int]]:
    """(first line, last line, test, branch) of every run-time `if` body in triton_jit.py (branch False: the else),
    and the lines of `for` loop bodies."""
    from repopt.optim import triton_jit

    source = Path(triton_jit.__file__).read_text()
    tree = ast.parse(source)
    constexpr_names = {"VEC", "INDEX64", "CT", "DT", "BLOCK"}
    regions, loops = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            if {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)} & constexpr_names:
                continue
            test = ast.get_source_segment(source, node.test)
            regions.append((node.body[0].lineno, node.body[-1].end_lineno, test, True))
            if node.orelse:
                regions.append((node.orelse[0].lineno, node.orelse[-1].end_lineno, test, False))
        elif isinstance(node, ast.For):
            loops.update(range(node.body[0].lineno, node.body[-1].end_lineno + 1))
    return regions, loops


def _instructions(sass: str) -> list[tuple[str, tuple[int, ...]]]:
    """(instruction, its source lines) of the kernel's function, in order: nvdisasm -gi writes, before a run of
    instructions, one comment per level of inlining (innermost first, each with the line it is inlined at)."""
    lines, out, fresh = [], [], True
    for raw in sass.splitlines():
        if "//## File" in raw:
            if fresh:
                lines, fresh = [], False
            lines += [int(x) for x in re.findall(r'triton_jit\.py", line (\d+)', raw)]
            continue
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", raw)
        if m:
            out.append((m.group(1), tuple(lines)))
            fresh = True
    return out


def path_counts(kind: str, sass: str, variant: dict) -> dict:
    """Instructions per element on each named path: {path: (fixed, per branch)} (per branch: AdamW's loop)."""
    regions, loops = _regions()
    instructions = _instructions(sass)
    # the subroutines (slow paths of division and sqrt) follow the kernel's last EXIT
    last_exit = max((i for i, (text, _) in enumerate(instructions) if re.search(r"\bEXIT\b", text)), default=-1)
    body = instructions[:last_exit + 1]
    per_thread = variant["BLOCK"] / (32 * variant["num_warps"])
    out = {}
    for name, flags in PATHS[kind].items():
        on = {**DEFAULTS, **flags}
        fixed = looped = 0
        for text, lines in body:
            if text.startswith("NOP"):
                continue
            taken = all(on.get(test, False) == branch for lo, hi, test, branch in regions
                        if any(lo <= line <= hi for line in lines))
            if taken:
                if any(line in loops for line in lines):
                    looped += 1
                else:
                    fixed += 1
        out[name] = (round(fixed / per_thread, 1), round(looped / per_thread, 1))
    return out


# ---- choosing (BLOCK, num_warps) -------------------------------------------------------------------------------------
LOADS = {"sgd": 3, "adamw": 4, "lion": 3}  # weight-sized tensors a kernel reads per element (p, g, state)
WORST = {"sgd": "nesterov+wd", "adamw": "amsgrad", "lion": "wd+maximize"}
# Little's law: an H200 at 4.8 TB/s with ~0.7 us of memory latency needs ~3.4 MB in flight, ~25 KB per SM (132)
IN_FLIGHT_NEEDED = 25e3


def resident_warps(registers: int, warps: int) -> int:
    """Warps of this kernel an SM holds (sm_80/sm_90: 64K registers, 64 warps, 32 blocks; registers are allocated
    per warp in units of 256)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(65536 // (per_warp * warps), 64 // warps, 32)
    return blocks * warps


def choose(results: list[dict]) -> dict:
    """Per (kind, dtype): the sweep's configurations with their occupancy and bytes in flight, and the one the rule
    picks. Eligible: no spills, at least 16 resident warps per SM (4 per scheduler, to issue while others wait on a
    dependent operation) and the bytes in flight Little's law asks for; then the fewest instructions per element on
    the heaviest path (AdamW: with three branches), and among those within 2% of it the fewest registers, then the
    largest BLOCK (fewer programs)."""
    table: dict = {}
    for r in results:
        if "paths" not in r:
            continue
        fixed, per_branch = r["paths"][WORST[r["kind"]]]
        per_thread = r["block"] // (32 * r["warps"])
        warps = resident_warps(r["reg"], r["warps"])
        item = torch.empty((), dtype=getattr(torch, r["dtype"])).element_size()
        in_flight = warps * 32 * per_thread * LOADS[r["kind"]] * item
        ok = not r["local"] and warps >= 16 and in_flight >= IN_FLIGHT_NEEDED
        table.setdefault((r["kind"], r["dtype"]), []).append(
            dict(block=r["block"], warps=r["warps"], reg=r["reg"], local=r["local"], resident=warps,
                 in_flight=in_flight, per_element=fixed + 3 * per_branch, ok=ok))
    for rows in table.values():
        eligible = [row for row in rows if row["ok"]]
        fewest = min((row["per_element"] for row in eligible), default=None)
        near = [row for row in eligible if row["per_element"] <= 1.02 * fewest]
        best = min(near, key=lambda row: (row["reg"], -row["block"]), default=None)
        for row in rows:
            row["chosen"] = row is best
    return table


# ---- the static performance model (a model: no GPU ran it) -------------------------------------------------------
BANDWIDTH = 4.8e12  # H200 HBM3e, bytes/s
ISSUE = 132 * 4 * 32 * 1.98e9  # SMs x schedulers x lanes x boost clock: lane-instructions/s (~33.4 T)
# bytes per float32 weight moved by a step: sgd with momentum reads p, g, buf and writes p, buf; adamw reads p, g, m,
# v and writes p, m, v; lion reads p, g, m and writes p, m (torch's fused SGD/AdamW move the same per weight)
BYTES = {"sgd": 20, "adamw": 28, "lion": 20}
MODEL_PATH = {"sgd": "momentum", "adamw": "default", "lion": "wd"}


def model(results: list[dict], arch: str = "repopt_vgg_b1") -> list[str]:
    """Lines of the model: per kernel (float32, sm_90, the path a plain run takes) bytes and instructions per element,
    the instruction count at which the kernel stops being memory-bound, and the step time predicted for `arch`
    against torch's fused optimizer moving the same bytes for every parameter."""
    from repopt import models

    with torch.device("meta"):
        net = models.create(arch)
    targets = [net.get_submodule(name).weight for name in net.target_conv_names()]
    n_target = sum(w.numel() for w in targets)
    n_all = sum(p.numel() for p in net.parameters())
    nb = 2  # RepOpt-VGG's conv branches per target (3x3, 1x1; the identity is the diagonal term)
    lines = [f"model (no GPU ran this): H200 {BANDWIDTH / 1e12:.1f} TB/s, issue 132 SMs x 4 schedulers x 32 lanes x "
             f"1.98 GHz = {ISSUE / 1e12:.1f} T lane-instructions/s; {arch}: {n_all / 1e6:.2f} M parameters, "
             f"{n_target / 1e6:.2f} M in {len(targets)} target convs"]
    for kind in KINDS:
        r = next((r for r in results if r["kind"] == kind and r["dtype"] == "float32" and r["arch"] == 90
                  and not r["index64"] and r["vec"] == 4 and "paths" in r), None)
        if r is None:
            continue
        fixed, per_branch = r["paths"][MODEL_PATH[kind]]
        per_element = fixed + nb * per_branch
        # plus what the launch reads once per step: tap tables (AdamW: one per branch), the per-row diagonal
        # columns, the block table and the metadata
        block = triton_kernels.CONFIG[(kind, torch.float32)][0]
        tables = sum(w.shape[0] * (4 * w.shape[2] * w.shape[3] * (nb if kind == "adamw" else 1) + 4)
                     + 16 * -(-w.numel() // block) + 8 * triton_kernels.NMETA for w in targets)
        memory = (BYTES[kind] * n_target + tables) / BANDWIDTH
        issue = per_element * n_target / ISSUE
        others = BYTES[kind] * (n_all - n_target) / BANDWIDTH  # the weights without multipliers: torch's fused step
        fused = BYTES[kind] * n_all / BANDWIDTH
        step = max(memory, issue) + others
        lines.append(f"  {kind:5} float32 ({MODEL_PATH[kind]}): {BYTES[kind]} B and {per_element:.1f} instructions per "
                     f"element (memory-bound below {ISSUE * BYTES[kind] / BANDWIDTH:.0f}); target convs: memory "
                     f"{memory * 1e6:.0f} us, issue {issue * 1e6:.0f} us; step {step * 1e6:.0f} us vs torch fused "
                     f"{fused * 1e6:.0f} us moving the same bytes: {step / fused:.3f}x (launch overheads not modelled)")
    return lines


# ---- the run -------------------------------------------------------------------------------------------------------
def _row(r: dict) -> str:
    paths = r.get("paths")
    if paths:
        shown = ", ".join(f"{k} {a:g}" + (f" + {b:g}/branch" if b else "") for k, (a, b) in paths.items())
    else:
        shown = f"PTX instructions {r.get('ptx_instructions')} (no SASS tools in this triton wheel)"
    return (f"  {r['kind']:5} {r['dtype']:8} sm_{r['arch']} index{'64' if r['index64'] else '32'} vec{r['vec']} "
            f"BLOCK {r['block']:4} warps {r['warps']}: {r.get('reg')} registers, {r.get('local')} B local (spills), "
            f"{r.get('stack')} B stack; instructions per element: {shown}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="also compile other (BLOCK, num_warps) for the table")
    args = ap.parse_args(argv)
    # before triton is imported (here and in the workers this process forks): compile for the GPU, do not interpret;
    # importing this module (as a test does) leaves the environment alone
    os.environ.pop("TRITON_INTERPRET", None)
    if "triton" in sys.modules:
        raise SystemExit("triton_compile_check: run it as a script: triton was imported before TRITON_INTERPRET "
                         "could be removed")
    archs = [int(a) for a in args.arch.split(",")]
    start = time.perf_counter()
    found, configurations = variants()
    jobs = []
    with tempfile.TemporaryDirectory(prefix="repopt-triton-check-") as workdir:
        os.environ["TRITON_CACHE_DIR"] = str(Path(workdir) / "cache")  # a fresh cache: every variant really compiles
        for (kind, dtype, variant), arch in itertools.product(found.values(), archs):
            jobs.append((kind, dtype, variant, arch, workdir, "check"))
        if args.sweep:
            for kind, dtype, (block, warps) in itertools.product(KINDS, DTYPES,
                                                                 itertools.product((512, 1024, 2048), (2, 4, 8))):
                variant = {**triton_kernels._variant(kind, dtype, [4096]), "BLOCK": block, "num_warps": warps}
                jobs.append((kind, dtype, variant, 90, workdir, "sweep"))
        print(f"{configurations} launch configurations (optimizer x flags x dtype x size) -> {len(found)} compiled "
              f"variants (the flags are run-time values) x sm_{', sm_'.join(map(str, archs))}: {len(jobs)} compiles "
              f"on {args.jobs} processes")
        # the control: Triton's other default (fp fusion on) must fail the PTX check, or the check proves nothing
        kind, dtype, variant = "sgd", torch.float32, triton_kernels._variant("sgd", torch.float32, [4096])
        jobs.append((kind, dtype, {**variant, "enable_fp_fusion": True}, archs[-1], workdir, "control"))
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_one, jobs))
        control = results.pop()
        swept = [r for r, job in zip(results, jobs) if job[5] == "sweep"]
        results = [r for r, job in zip(results, jobs) if job[5] != "sweep"]
    failures = [(r, e) for r in results for e in r["errors"]]
    seen = set()
    for r in sorted(results, key=lambda r: (r["kind"], r["dtype"], r["arch"], r["index64"], r["vec"], r["block"],
                                            r["warps"])):
        key = (r["kind"], r["dtype"], r["arch"], r["index64"], r["vec"], r["block"], r["warps"])
        if key not in seen:
            seen.add(key)
            print(_row(r))
    ops = sorted({op for r in results for op in r.get("ptx_ops", [])})
    print(f"control, sgd float32 compiled with enable_fp_fusion=True: {len(control['errors'])} problems found "
          f"({'; '.join(control['errors'][:3])})")
    if not control["errors"]:
        failures.append((control, "the PTX check found nothing in code compiled with fp fusion on"))
    print(f"float operations in the PTX: {' '.join(ops)}")
    if args.sweep:
        print("sweep (sm_90, heaviest path; AdamW with 3 branches): BLOCK warps: registers, spills, resident warps "
              "per SM, bytes of loads in flight per SM, instructions per element (* the rule's choice; CONFIG holds "
              "it)")
        for (kind, dtype), rows in sorted(choose(swept).items()):
            current = triton_kernels.CONFIG[(kind, getattr(torch, dtype))]
            for row in sorted(rows, key=lambda row: (row["block"], row["warps"])):
                print(f"  {kind:5} {dtype:8} {row['block']:4} {row['warps']}: {row['reg']:3} reg, {row['local']} B "
                      f"local, {row['resident']:2} warps, {row['in_flight'] / 1e3:5.1f} KB, {row['per_element']:6.1f}"
                      f"{' *' if row['chosen'] else ''}"
                      f"{' (CONFIG)' if (row['block'], row['warps']) == current else ''}")
    for r, e in failures:
        print(f"FAIL {r['kind']} {r['dtype']} sm_{r['arch']} index64={r['index64']} vec={r['vec']}: {e}")
    for line in model(results):
        print(line)
    print(f"{len(results) + 1} compiles ({sum(r.get('seconds', 0) for r in results):.0f} s of compiling), "
          f"{len(failures)} failures, {time.perf_counter() - start:.0f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
