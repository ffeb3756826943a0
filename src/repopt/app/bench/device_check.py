"""The prepared check of repopt on one device (bench/device_check.sh): everything issue 16 asks to see on a GPU, in
one process, as one JSON object on stdout.

    python -m repopt.app.bench.device_check --device cuda        # the H200 settings (A0 and B1 at 224, ~8 minutes)
    python -m repopt.app.bench.device_check --device cpu --toy   # the same steps at toy sizes (CI keeps them working)

1. proofs: the GR == CSLA proofs on the device (float64), each case on the path it names (on CUDA the default cases
   take the Triton kernels);
2. optimizer step: RepOptSGD vs torch SGD(fused=True), RepOptAdamW vs torch AdamW(fused=True), same target model and
   gradients, interleaved, with the path RepOpt really took;
3. training: images/s of RepOpt-VGG (target model + RepOptSGD) vs RepVGG (multi-branch + torch SGD), same batch, with
   AMP (fp16 + GradScaler on CUDA, bf16 + GradScaler on CPU) and channels_last; peak memory from the CUDA allocator;
4. the largest batch that fits for each (the paper's MaxBS): doubling, then bisection, until out of memory;
5. AMP: a GradScaler overflow on the very first step (and a later one) leaves the run equal, bit for bit, to the run
   of its real steps alone, on the device's default path.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

# (architectures, image size, batch, timed steps, proof steps, max-batch cap) of the two settings
FULL = dict(archs=("repopt_vgg_a0", "repopt_vgg_b1"), image_size=224, batch=64, steps=8, proof_steps=100,
            max_batch_cap=2048, num_classes=1000)
TOY = dict(archs=("repopt_vgg_tiny",), image_size=32, batch=4, steps=2, proof_steps=5, max_batch_cap=16,
           num_classes=10)


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def proofs(device: torch.device, steps: int) -> dict:
    from ...proofs import OPTIMIZERS, run_proof, unavailable

    cases, left_out = [], {}
    for name in OPTIMIZERS:
        why = unavailable(name, device)
        if why is not None:
            left_out[name] = why
            continue
        for branches in ("3x3+1x1+identity", "depthwise 3x3+identity"):
            cases.append(run_proof(name, branches, steps, device=device).as_dict())
    return {"ok": all(c["ok"] for c in cases), "cases": cases, "left_out": left_out}


def optimizer_steps(device: torch.device, arch: str, num_classes: int, repeats: int) -> dict:
    from ...optim import RepOptAdamW, param_groups
    from .optimizer import _same_gradients
    from .timing import interleaved, paired_ratio, summary
    from .workloads import bench_scales, build, create

    scales = bench_scales(arch, num_classes)
    plain, torch_sgd = build("plain", arch, num_classes, device=device)
    rep, rep_sgd = build("repopt", arch, num_classes, scales=scales, device=device)
    torch.manual_seed(0)
    plain_a = create(arch, "target", num_classes).to(device)
    rep_a = create(arch, "target", num_classes).to(device)
    torch_adamw = torch.optim.AdamW(param_groups(plain_a, 0.05), lr=1e-3, fused=True)
    rep_adamw = RepOptAdamW.from_scales(rep_a, scales, lr=1e-3, weight_decay=0.05, fused=True)
    _same_gradients([plain, rep, plain_a, rep_a])
    times = interleaved({"torch_sgd": torch_sgd.step, "repopt_sgd": rep_sgd.step, "torch_adamw": torch_adamw.step,
                         "repopt_adamw": rep_adamw.step}, repeats, warmup=2, sync=_sync(device))
    return {"arch": arch, **{k: summary(v) for k, v in times.items()},
            "sgd_ratio": paired_ratio(times["repopt_sgd"], times["torch_sgd"]),
            "adamw_ratio": paired_ratio(times["repopt_adamw"], times["torch_adamw"]),
            "sgd_path": rep_sgd.last_path, "adamw_path": rep_adamw.last_path}


def _amp(device: torch.device):
    """(autocast context factory, GradScaler): fp16 on CUDA, bf16 on CPU (the scaler on in both, to exercise it)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return (lambda: torch.autocast(device.type, dtype=dtype)), torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)


def _trainer(method: str, arch: str, num_classes: int, device: torch.device, batch_size: int, image_size: int):
    """A step function of `method` at `batch_size` (AMP, channels_last), and its optimizer."""
    from .workloads import batch, build

    model, opt = build(method, arch, num_classes, device=device)
    model.to(memory_format=torch.channels_last)
    x, y = batch(batch_size, image_size, num_classes, device)
    x = x.contiguous(memory_format=torch.channels_last)
    autocast, scaler = _amp(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step, opt


def training(device: torch.device, arch: str, num_classes: int, image_size: int, batch_size: int, steps: int) -> dict:
    out = {"arch": arch, "image_size": image_size, "batch": batch_size, "amp": True, "channels_last": True}
    for method in ("repopt", "repvgg"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step, opt = _trainer(method, arch, num_classes, device, batch_size, image_size)
        for _ in range(2):
            step()
        sync = _sync(device) or (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        seconds = time.perf_counter() - t0
        out[method] = {"images_per_s": batch_size * steps / seconds,
                       "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                       "path": getattr(opt, "last_path", "torch")}
        del step, opt
    out["throughput_ratio"] = out["repopt"]["images_per_s"] / out["repvgg"]["images_per_s"]
    return out


def _fits(method, arch, num_classes, device, batch_size, image_size) -> bool:
    try:
        step, _ = _trainer(method, arch, num_classes, device, batch_size, image_size)
        step()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_batch(device: torch.device, arch: str, num_classes: int, image_size: int, start: int, cap: int) -> dict:
    """The largest batch that trains (two steps) for each method: doubling from `start`, then bisection; `cap` bounds
    the search (reported when reached)."""
    out = {}
    for method in ("repopt", "repvgg"):
        good, bad = 0, None
        size = start
        while size <= cap and _fits(method, arch, num_classes, device, size, image_size):
            good, size = size, size * 2
        bad = size if size <= cap else None
        while bad is not None and bad - good > max(1, good // 32):  # within ~3%
            mid = (good + bad) // 2
            good, bad = (mid, bad) if _fits(method, arch, num_classes, device, mid, image_size) else (good, mid)
        out[method] = {"max_batch": good, "cap_reached": bad is None}
    out["ratio"] = out["repopt"]["max_batch"] / max(out["repvgg"]["max_batch"], 1)
    return out


def amp_overflow(device: torch.device) -> dict:
    """RepOptSGD and RepOptAdamW (fused, the default device path) with GradScaler: overflows on the first step and on
    the third leave parameters equal to the run of the real steps alone."""
    from ...optim import RepOptAdamW, RepOptSGD
    from .workloads import bench_scales, create

    scales = bench_scales("repopt_vgg_tiny", 10)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 3, 16, 16, generator=g).to(device), torch.randint(0, 10, (4,), generator=g).to(device))
            for _ in range(3)]

    def run(cls, kwargs, skipped):
        torch.manual_seed(0)
        model = create("repopt_vgg_tiny", "target", 10).to(device)
        opt = cls.from_scales(model, scales, generator=torch.Generator().manual_seed(0), **kwargs)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
        real = iter(data)
        for i in range(len(data) + len(skipped)):
            opt.zero_grad()
            x, y = data[0] if i in skipped else next(real)
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if i in skipped:
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        return [p.detach().cpu() for p in model.parameters()], opt.last_path

    out = {}
    for name, cls, kwargs in (("sgd", RepOptSGD, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True)),
                              ("adamw", RepOptAdamW, dict(lr=1e-2, fused=True))):
        want, path = run(cls, kwargs, set())
        same = all(all(torch.equal(a, b) for a, b in zip(run(cls, kwargs, s)[0], want)) for s in ({0}, {2}))
        out[name] = {"skipped_steps_are_no_ops": same, "path": path}
    out["ok"] = all(v["skipped_steps_are_no_ops"] for v in out.values())
    return out


def device_check(device: torch.device, toy: bool) -> dict:
    from .timing import environment

    cfg = TOY if toy else FULL
    t0 = time.perf_counter()
    result = {"environment": environment(device), "settings": "toy" if toy else "full"}
    result["proofs"] = proofs(device, cfg["proof_steps"])
    result["amp_first_step_overflow"] = amp_overflow(device)
    result["optimizer_step"] = [optimizer_steps(device, a, cfg["num_classes"], 5 if toy else 20)
                                for a in cfg["archs"]]
    result["training"] = [training(device, a, cfg["num_classes"], cfg["image_size"], cfg["batch"], cfg["steps"])
                          for a in cfg["archs"]]
    result["max_batch"] = [{"arch": a, **max_batch(device, a, cfg["num_classes"], cfg["image_size"], cfg["batch"],
                                                   cfg["max_batch_cap"])} for a in cfg["archs"]]
    result["ok"] = result["proofs"]["ok"] and result["amp_first_step_overflow"]["ok"]
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repopt.app.bench.device_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--toy", action="store_true", help="toy sizes: seconds, checks the machinery only")
    args = parser.parse_args(argv)
    from ..train import resolve_device

    result = device_check(resolve_device(args.device), args.toy)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
