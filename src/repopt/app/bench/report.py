"""The text report of `repopt bench`: the five figures against their targets, then the absolute numbers behind them."""
from __future__ import annotations

from .suite import KEYS

MIB = 1 << 20


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_report(r: dict) -> str:
    env, d = r["environment"], r["details"]
    loads = [env.get("load_average_1min"), env.get("load_average_1min_end")]
    loads = ["n/a" if v is None else f"{v:.2f}" for v in loads]
    lines = [f"repopt bench: {env['device']}, torch {env['torch']}, {env['threads']} threads, "
             f"load average {loads[0]} at start, {loads[1]} at end", ""]
    o = d["optimizer"]
    notes = {
        "optimizer_step_ratio": f"{o['arch']} ({o['params'] / 1e6:.1f}M params): RepOptSGD ({o['path']} path) "
                                f"{1e3 * o['repopt_sgd']['median_s']:.1f} ms vs torch SGD "
                                f"{1e3 * o['torch_sgd']['median_s']:.1f} ms per step",
        "optimizer_extra_state_fraction": f"{o['extra_state_bytes'] / 1024:.1f} KiB kept over "
                                          f"{o['param_bytes'] / MIB:.1f} MiB of parameters (plus a "
                                          f"{o['scratch_bytes_per_step'] / 1024:.0f} KiB scratch per step)",
        "train_step_ratio_vs_plain": "same target model and batch, torch SGD vs RepOptSGD (worst size)",
        "train_throughput_ratio_vs_repvgg": "images/s, same arch and batch (worst size)",
        "peak_memory_ratio_vs_repvgg": "peak RSS growth of a fresh process (worst size)",
    }
    lines.append(f"{'figure':34s} {'value':>7s}  {'target':8s} {'met':4s} setting")
    for k in KEYS:
        met = {True: "yes", False: "NO", None: "-"}[r["met"][k]]
        lines.append(f"{k:34s} {_fmt(r[k]):>7s}  {r['targets'][k]:8s} {met:4s} {notes[k]}")
        e = o.get("repopt_sgd_eager") if k == "optimizer_step_ratio" else None
        if e is not None:
            lines.append(f"{'  ... with native=False (eager)':34s} {e['ratio']:7.3f}  {'':8s} {'':4s} "
                         f"{1e3 * e['median_s']:.1f} ms per step (blocks of M * G in a scratch, then torch SGD)")
        c = o.get("repopt_sgd_compiled") if k == "optimizer_step_ratio" else None
        if c is not None:
            lines.append(f"{'  ... with compiled=True':34s} {c['ratio']:7.3f}  {'':8s} {'':4s} "
                         f"{1e3 * c['median_s']:.1f} ms per step after {c['compile_seconds']:.1f} s of compiling"
                         + (" (compile failed: eager fallback)" if c["fell_back_to_eager"] else ""))
    a = d.get("adaptive_optimizers")
    if a:
        def row(name, rep, base, ratio, eager):
            extra = f" (eager path {a[eager]:.2f}, {1e3 * a[rep + '_eager']['median_s']:.1f} ms)" if eager in a else ""
            return (f"  {name:32s} {a[ratio]:7.3f}  {1e3 * a[rep]['median_s']:.1f} ms vs "
                    f"{1e3 * a[base]['median_s']:.1f} ms per step{extra}")
        lines += ["", f"other optimizers ({a['arch']}, same gradients, {a['path']} path; not among the claimed figures)",
                  row("RepOptAdamW / torch AdamW fused", "repopt_adamw", "torch_adamw", "adamw_ratio",
                      "adamw_eager_ratio"),
                  row("RepOptLion / Lion", "repopt_lion", "lion", "lion_ratio", "lion_eager_ratio")]
    lines += ["", "training steps (forward + backward + step; median over interleaved rounds)",
              f"{'arch':16s} {'size':>5s} {'batch':>5s} {'method':7s} {'ms/step':>9s} {'images/s':>9s}"]
    for t in d["training"]:
        for m in ("plain", "repopt", "repvgg"):
            if m in t:
                lines.append(f"{t['arch']:16s} {t['image_size']:5d} {t['batch_size']:5d} {m:7s} "
                             f"{1e3 * t[m]['median_s']:9.1f} {t[m]['images_per_s']:9.1f}")
        ratios = []
        if "step_ratio_repopt_vs_plain" in t:
            ratios.append(f"repopt/plain step {t['step_ratio_repopt_vs_plain']:.3f}")
        if "throughput_ratio_repopt_vs_repvgg" in t:
            ratios.append(f"repopt/repvgg throughput {t['throughput_ratio_repopt_vs_repvgg']:.3f}")
        lines.append(f"{'':16s} {'':5s} {'':5s} {', '.join(ratios)}")
    if d["memory"]:
        lines += ["", f"peak training memory ({d['memory'][0]['repopt']['how']}; median of "
                      f"{d['memory'][0].get('repeats', 1)} fresh processes per method, each run's peak in brackets)",
                  f"{'arch':16s} {'size':>5s} {'batch':>5s} {'method':7s} {'peak MiB':>9s} {'params MiB':>10s} "
                  f"{'saved act. MiB':>14s}"]
        for mem in d["memory"]:
            for m in ("repopt", "repvgg"):
                e = mem[m]
                each = " ".join(f"{b / MIB:.0f}" for b in e.get("peak_bytes_each", []))
                lines.append(f"{mem['arch']:16s} {mem['image_size']:5d} {mem['batch_size']:5d} {m:7s} "
                             f"{e['peak_bytes'] / MIB:9.1f} {e['param_bytes'] / MIB:10.1f} "
                             f"{e['saved_activation_bytes'] / MIB:14.1f}  [{each}]")
            lines.append(f"{'':16s} {'':5s} {'':5s} repopt/repvgg peak {mem['peak_ratio_repopt_vs_repvgg']:.3f}, "
                         f"saved activations {mem['saved_activation_ratio_repopt_vs_repvgg']:.3f}")
    return "\n".join(lines)
