"""`repopt scales import|show|diff`: convert released reference scales, print statistics, compare two files."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..._io import atomic_write

NAME = "scales"
HELP = "Import released RepOpt scales (.pth) into repopt's format, show per-stage statistics, or compare two files."
EXAMPLES = """examples:
  repopt scales import RepOpt-VGG-B1-scales.pth -o b1.safetensors --arch repopt_vgg_b1
  repopt scales import RepOpt-VGG-B1-scales.pth -o b1-timm.safetensors --for timm:repvgg_b1   # timm's names
  repopt scales show b1.safetensors                # per-stage mean/std/min/max of each branch, negatives
  repopt scales show b1.safetensors --json --plot b1.png
  repopt scales show runs/search --trajectory --plot trajectory.png   # per epoch: moved, settled or not
  repopt scales diff b1.safetensors searched.safetensors   # exit code 0 if equal, 1 if they differ
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert a released .pth (or a repopt file) into a validated .safetensors")
    imp.add_argument("source", help="scales file: a released reference .pth or a repopt .safetensors")
    imp.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    imp.add_argument("--arch", "--for", dest="arch",
                     help="model the scales are for, e.g. repopt_vgg_b1 or timm:repvgg_b1 (RepOpt-VGG names are "
                          "renamed to timm's; default: the registered model whose target convs they fit exactly)")
    imp.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    show = sub.add_parser("show", help="per-stage statistics of each branch")
    show.add_argument("file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.add_argument("--layers", action="store_true", help="one row per conv instead of per stage")
    show.add_argument("--plot", metavar="PNG", help="also draw the per-conv scales into this image (matplotlib)")
    show.add_argument("--trajectory", action="store_true",
                      help="the search's trajectory instead (FILE: a search's run directory or its scales file, "
                           "with scales_trajectory.jsonl beside it): how much the scales moved per epoch and "
                           "whether they settled; --plot draws it")
    diff = sub.add_parser("diff", help="compare two scales files layer by layer")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--atol", type=float, default=0.0, help="differences up to this are equal (default 0)")
    diff.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    return {"import": _import, "show": _show, "diff": _diff}[args.action](args)


# ---- import --------------------------------------------------------------------------------------------------------
def _target_model(arch: str):
    import torch

    from ..cli import UserError
    from ...integrations import timm as timm_models
    from ...models import create, list_models

    if timm_models.is_timm_arch(arch):
        try:
            timm_models.check_arch(arch)
        except ValueError as e:
            raise UserError(f"--arch {arch!r}: {e}") from None
    elif arch not in list_models():
        raise UserError(f"unknown --arch {arch!r}; known: {', '.join(list_models())} (or timm:NAME)")
    with torch.device("meta"):  # only the conv shapes are needed: no memory, no init time
        return create(arch, mode="target")


def _check_fits(scales, arch: str, source: str):
    from ...models import target_convs
    from ...scales import ScalesError

    model = _target_model(arch)
    try:
        scales.bind(model, strict=False)  # every entry fits a conv (names the layer otherwise)
    except ScalesError as e:
        raise ScalesError(f"{source} does not fit {arch}: {e}") from None
    missing = [n for n in target_convs(model) if n not in scales]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ScalesError(f"{source} does not fit {arch}: layer {missing[0]!r}{more} has no scales in this file")
    return model


def _infer_arch(scales, source: str) -> str:
    from ..cli import UserError
    from ...models import list_models
    from ...scales import ScalesError

    fits = []
    for arch in list_models():
        try:
            _check_fits(scales, arch, source)
            fits.append(arch)
        except ScalesError:
            pass
    if len(fits) != 1:
        found = "no registered model" if not fits else f"several models ({', '.join(fits)})"
        raise UserError(f"{source}: {found} fits these scales; pass --arch")
    return fits[0]


def _import(args) -> int:
    from ..cli import UserError
    from ...scales import load_scales, save_scales

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it")
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the output must be a .safetensors file")
    from ...integrations import timm as timm_models

    scales = load_scales(args.source)
    if args.arch and timm_models.is_timm_arch(args.arch):
        scales = timm_models.scales_for(scales, args.arch)
    arch = args.arch or _infer_arch(scales, args.source)
    model = _check_fits(scales, arch, args.source)
    scales.metadata["arch"] = arch
    scales.metadata["imported_from"] = Path(args.source).name
    save_scales(scales, out, model=model)
    print(f"wrote {out}: {len(scales)} convs for {arch} (validated against its target model)")
    return 0


# ---- show ----------------------------------------------------------------------------------------------------------
def stage_of(name: str) -> str:
    """'stage3.7.conv' -> 'stage3'; 'blocks.6.2.ghost1...' -> 'blocks.6'; 'layer1.0.conv2' -> 'layer1'."""
    parts = name.split(".")
    if len(parts) > 2 and not re.search(r"\d", parts[0]) and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _stats(values) -> dict:
    import torch

    v = torch.cat([t.double().reshape(-1) for t in values])
    return {"channels": v.numel(), "mean": v.mean().item(), "std": v.std().item() if v.numel() > 1 else 0.0,
            "min": v.min().item(), "max": v.max().item(), "negative": int((v < 0).sum())}


def summarize(scales, per_layer: bool = False) -> list[dict]:
    """One row per (stage or conv, branch): convs, channels, mean, std, min, max, number of negative scales."""
    groups: dict[tuple[str, str], list] = {}
    for name, entry in scales.items():
        for branch, t in entry.items():
            groups.setdefault((name if per_layer else stage_of(name), branch), []).append(t)
    key = "layer" if per_layer else "stage"
    return [{key: where, "branch": branch, "convs": len(ts), **_stats(ts)} for (where, branch), ts in groups.items()]


def _show(args) -> int:
    from ...scales import load_scales

    if args.trajectory:
        return _show_trajectory(args)

    scales = load_scales(args.file)
    rows = summarize(scales, per_layer=args.layers)
    totals = {}
    for branch in dict.fromkeys(b for entry in scales.values() for b in entry):
        totals[branch] = _stats([e[branch] for e in scales.values() if branch in e])
    if args.plot:
        _plot(scales, args.plot, args.file)
    if args.json:
        print(json.dumps({"file": str(args.file), "metadata": scales.metadata, "convs": len(scales),
                          "rows": rows, "branches": totals}, indent=2))
        return 0
    key = "layer" if args.layers else "stage"
    width = max([len(key)] + [len(r[key]) for r in rows])
    print(f"{args.file}: {len(scales)} convs" + "".join(f", {k}={v}" for k, v in scales.metadata.items()))
    print(f"{key:{width}s} {'branch':>8s} {'convs':>5s} {'chans':>6s} {'mean':>8s} {'std':>8s} {'min':>8s} "
          f"{'max':>8s} {'neg':>5s}")
    for r in rows:
        print(f"{r[key]:{width}s} {r['branch']:>8s} {r['convs']:5d} {r['channels']:6d} {r['mean']:8.4f} "
              f"{r['std']:8.4f} {r['min']:8.4f} {r['max']:8.4f} {r['negative']:5d}")
    for branch, s in totals.items():
        print(f"all {branch}: {s['channels']} scales, mean {s['mean']:.4f}, {s['negative']} negative")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _show_trajectory(args) -> int:
    from ..cli import UserError
    from ...search_trajectory import TRAJECTORY, describe_settling, read_trajectory, settling

    run = Path(args.file) if Path(args.file).is_dir() else Path(args.file).parent
    try:
        records = read_trajectory(run)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not records:
        raise UserError(f"{run / TRAJECTORY} does not exist: only a search (repopt search, or the one before "
                        f"train/pipeline) records the scales' trajectory")
    report = settling(records)
    if args.plot:
        _matplotlib_or_refuse()
        from ..metrics import plot_scales_trajectory

        plot_scales_trajectory(records, Path(args.plot), title=str(run))
    if args.json:
        print(json.dumps({"run": str(run), "settling": report, "epochs": [
            {k: r[k] for k in ("epoch", "moved", "from_initial")} for r in records]}, indent=2))
        return 0
    print(f"{run}: {describe_settling(report)}")
    print(f"{'epoch':>5s} {'moved':>10s} {'from initial':>12s}")
    for r in records:
        moved = "-" if r["moved"] is None else f"{r['moved']:.4%}"
        initial = "-" if r["from_initial"] is None else f"{r['from_initial']:.4%}"
        print(f"{r['epoch']:5d} {moved:>10s} {initial:>12s}")
    if report.get("warning"):
        print(f"warning: {report['warning']}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def _matplotlib_or_refuse() -> None:
    from ..cli import UserError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


def _plot(scales, path: str, title: str) -> None:
    from ..cli import UserError

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    names = list(scales)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(names)), 4.0))
    for branch in dict.fromkeys(b for e in scales.values() for b in e):
        xs = [i for i, n in enumerate(names) if branch in scales[n]]
        ts = [scales[names[i]][branch].double() for i in xs]
        mean = [t.mean().item() for t in ts]
        line, = ax.plot(xs, mean, marker=".", label=f"{branch} (mean)")
        ax.fill_between(xs, [t.min().item() for t in ts], [t.max().item() for t in ts], color=line.get_color(),
                        alpha=0.15)
    for i in range(1, len(names)):
        if stage_of(names[i]) != stage_of(names[i - 1]):
            ax.axvline(i - 0.5, color="grey", lw=0.5)
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set(xlabel="conv (model order; shaded: min..max over channels)", ylabel="scale", title=Path(title).name)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# ---- diff ----------------------------------------------------------------------------------------------------------
def compare(a, b, atol: float = 0.0) -> dict:
    """Layers only in one file, branch or size mismatches, and the largest differences of the common scales."""
    only_a, only_b = [n for n in a if n not in b], [n for n in b if n not in a]
    mismatched, diffs = [], []
    for name in (n for n in a if n in b):
        ea, eb = a[name], b[name]
        if set(ea) != set(eb):
            mismatched.append({"layer": name, "reason": f"branches {sorted(ea)} vs {sorted(eb)}"})
            continue
        for branch in ea:
            ta, tb = ea[branch].double(), eb[branch].double()
            if ta.shape != tb.shape:
                mismatched.append({"layer": name, "reason": f"{branch}: {ta.numel()} vs {tb.numel()} channels"})
                continue
            d = (ta - tb).abs()
            diffs.append({"layer": name, "branch": branch, "max_abs": d.max().item() if d.numel() else 0.0,
                          "mean_abs": d.mean().item() if d.numel() else 0.0,
                          "sign_flips": int(((ta < 0) != (tb < 0)).sum())})
    differing = [d for d in diffs if d["max_abs"] > atol]
    worst = max((d["max_abs"] for d in diffs), default=0.0)
    return {"only_in_a": only_a, "only_in_b": only_b, "mismatched": mismatched, "compared": len(diffs),
            "differing": sorted(differing, key=lambda d: -d["max_abs"]), "max_abs": worst,
            "equal": not (only_a or only_b or mismatched or differing)}


def _diff(args) -> int:
    from ..cli import UserError
    from ...scales import load_scales

    if not math.isfinite(args.atol) or args.atol < 0:
        raise UserError(f"--atol must be a finite number >= 0, got {args.atol}")
    result = compare(load_scales(args.a), load_scales(args.b), args.atol)
    if args.json:
        print(json.dumps({"a": str(args.a), "b": str(args.b), "atol": args.atol, **result}, indent=2))
        return 0 if result["equal"] else 1
    for key, label in (("only_in_a", args.a), ("only_in_b", args.b)):
        if result[key]:
            print(f"only in {label}: {len(result[key])} layers, first {result[key][0]}")
    for m in result["mismatched"]:
        print(f"{m['layer']}: {m['reason']}")
    for d in result["differing"][:20]:
        print(f"{d['layer']} {d['branch']}: max |diff| {d['max_abs']:.4g}, mean {d['mean_abs']:.4g}, "
              f"{d['sign_flips']} sign flips")
    if len(result["differing"]) > 20:
        print(f"... and {len(result['differing']) - 20} more differing branches")
    verdict = "equal" if result["equal"] else "differ"
    print(f"{result['compared']} branch vectors compared, largest difference {result['max_abs']:.4g}: "
          f"the files {verdict}" + (f" (atol {args.atol:g})" if args.atol else ""))
    return 0 if result["equal"] else 1
