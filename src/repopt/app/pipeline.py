"""`repopt pipeline`: hyper-search -> train repopt, repvgg and plain (same epochs, seed, data) -> eval -> INT8 -> report.

Every stage writes into its own folder under OUT and is skipped when already finished, so an interrupted pipeline
re-run with the same command picks up where it stopped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .._io import write_json, write_text
from .checkpoint import mode_of
from .cli import UserError
from .metrics import plot_curves
from .runs import finished_result, hs_config, search_scales
from .train import TrainConfig, train

METHODS = ("repopt", "repvgg", "plain")
INT8_BACKENDS = {"torchao": "torchao PT2E, x86 (oneDNN int8)",
                 "onnxruntime": "onnxruntime QDQ (RUN/model.int8.onnx)"}


def int8_column(run_dir: Path, calib_batches: int = 8, quiet: bool = True, backend: str = "torchao") -> dict | None:
    """INT8 PTQ top-1 of a finished run's deployed model, or None when the backend's extra is missing. The
    onnxruntime backend also leaves the INT8 file in the run directory."""
    if backend == "onnxruntime":
        from .deploy import int8_onnx_column

        return int8_onnx_column(run_dir, calib_batches, quiet)
    from .checkpoint import load_trained, run_data_options
    from ..data import load_dataset
    from ..quant import QuantDependencyError, QuantSettings, evaluate_top1, quantize_ptq

    model, conf = load_trained(run_dir, deploy=True)
    ds = load_dataset(conf["dataset"], conf.get("data_dir"), conf.get("image_size"), **run_data_options(conf))
    settings = QuantSettings(calib_batches=calib_batches)
    try:
        int8 = quantize_ptq(model, ds.calibration_batches(calib_batches, 64), settings)
    except QuantDependencyError:
        if not quiet:
            print("torchao is not installed: no INT8 column (pip install 'repopt[quant]')")
        return None
    return {"int8_top1": evaluate_top1(int8, ds.test_batches(64)), "int8_settings": settings.to_dict()}


def plan_methods(arch: str, methods=METHODS, searches: bool = True) -> tuple[tuple[str, ...], dict[str, str]]:
    """The methods the pipeline can run on `arch`, checked against the modes the model builds before any stage
    starts (a hyper-search of an hour must not end in "unknown mode"), and {skipped method: the one line saying
    why}. A model without a multi-branch training form (RepOpt-GhostNet here: its counterpart RepGhostNet is not
    built by repopt; a timm model without blocks repopt fuses) has no repvgg row; one without an HS form cannot be
    searched, which is refused."""
    from ..models.registry import supported_modes

    try:
        modes = supported_modes(arch)
    except ValueError as e:  # unknown name: one sentence, before anything runs
        raise UserError(str(e)) from None
    if searches and "hs" not in modes:
        raise UserError(f"{arch} has no hyper-search form (it builds modes {', '.join(modes)}): give the repopt row "
                        f"a scales file with --scales")
    runnable = tuple(m for m in methods if mode_of(m) in modes)
    skipped = {m: f"{arch} has no {'multi-branch training' if m == 'repvgg' else mode_of(m)} form (it builds modes "
                  f"{', '.join(modes)}): the pipeline runs {' and '.join(runnable)}, not {m}"
               for m in methods if m not in runnable}
    return runnable, skipped


def run_pipeline(base: TrainConfig, hs_epochs: int, methods=METHODS, int8: bool = True,
                 int8_backend: str = "torchao", scales: str | None = None) -> dict:
    """`scales`: a scales file (or 'ones') for the repopt row instead of a search on the pipeline's own data."""
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda msg: None) if base.quiet else (lambda msg: print(f"[pipeline] {msg}", flush=True))
    methods, skipped = plan_methods(base.arch, methods, searches=scales is None)
    if base.init_from:
        from .train import rows_for_init_from

        methods, refused = rows_for_init_from(base, methods)
        skipped.update(refused)
    for note in skipped.values():
        say(note)
    hs_result = {"top1": None}
    if scales is None:
        say(f"hyper-search: {base.arch} on {base.dataset}, {hs_epochs} epochs -> {out / 'search'}")
        scales, hs_result = search_scales(hs_config(base, out / "search", hs_epochs))
    else:
        say(f"no hyper-search: the repopt row uses the scales {scales}")
    rows = []
    for method in methods:
        ablations = {} if method == "repopt" else {"reinit": True, "mask": True}  # they apply to the repopt row
        cfg = dataclasses.replace(base, method=method, out=str(out / method),
                                  scales=str(scales) if method == "repopt" else None, **ablations)
        say(f"train {method}: {cfg.epochs} epochs -> {cfg.out}")
        result = finished_result(cfg) or train(cfg)
        row = {k: result[k] for k in ("method", "top1", "train_seconds", "train_images_per_s", "params")}
        row["deployed_top1"] = result["deployed_top1"]
        if "kernel_build_seconds" in result:  # before the clock: apart from train s and img/s
            row["kernel_build_seconds"], row["kernels"] = result["kernel_build_seconds"], result["kernels"]
        if int8:
            say(f"int8 {method} ({int8_backend})")
            q = int8_column(Path(cfg.out), quiet=base.quiet, backend=int8_backend)
            if q is not None:
                row["int8_top1"] = q["int8_top1"]
                report_settings = q["int8_settings"]
        rows.append(row)
    report = {"dataset": base.dataset, "arch": base.arch, "epochs": base.epochs, "hs_epochs": hs_epochs,
              "seed": base.seed, "batch_size": base.batch_size, "optimizer": base.optimizer,
              "hs_top1": hs_result["top1"], "hs_settling": hs_result.get("scales_settling"), "scales": str(scales),
              "train_subset": base.train_subset,
              "image_size": result.get("image_size"), "results": rows, "skipped_methods": skipped,
              "init_from": base.init_from}
    if int8 and any("int8_top1" in r for r in rows):
        report["int8_settings"] = report_settings
        report["int8_backend"] = INT8_BACKENDS[int8_backend]
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    plot_curves({m: out / m / "metrics.jsonl" for m in methods}, out / "curves.png", quiet=True)
    return report


def report_markdown(report: dict) -> str:
    has_int8 = any("int8_top1" in r for r in report["results"])
    head = "| method | top-1 (%) |" + (" INT8 top-1 (%) |" if has_int8 else "") + \
        " train s | train img/s | deployed params |"
    lines = [f"# repopt pipeline: {report['arch']} on {report['dataset']}", "",
             f"{report['epochs']} epochs (hyper-search {report['hs_epochs']} epochs), batch {report['batch_size']}, "
             f"{report['optimizer']}, seed {report['seed']}.", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in report["results"]:
        int8 = f" {r['int8_top1']:.2f} |" if has_int8 and "int8_top1" in r else (" - |" if has_int8 else "")
        lines.append(f"| {r['method']} | {r['top1']:.2f} |{int8} {r['train_seconds']:.1f} | "
                     f"{r['train_images_per_s']:.0f} | {r['params']:,} |")
    built = [f"{r['method']}: its optimizer's kernels ({r['kernels']}) were built or loaded in "
             f"{r['kernel_build_seconds']:.1f} s before training, outside its train s and img/s."
             for r in report["results"] if "kernel_build_seconds" in r]
    lines += ["", *built] if built else []
    if has_int8 and report.get("int8_backend"):
        lines += ["", f"INT8: post-training quantization with {report['int8_backend']}, test set."]
    notes = [f"Not run: {note}." for note in report.get("skipped_methods", {}).values()]
    lines += ["", *notes] if notes else []
    if report.get("init_from"):
        lines += ["", f"Every row started from the weights of {report['init_from']} (the hyper-search from scratch)."]
    if report["hs_top1"] is None:
        lines += ["", f"No hyper-search: the repopt row used the scales {report['scales']}.", ""]
    else:
        lines += ["", "The hyper-search model's own accuracy is not a quality signal "
                  f"(HS top-1 here: {report['hs_top1']:.2f}%)."]
        if report.get("hs_settling"):  # the search judged its own convergence (repopt/search_trajectory.py)
            from ..search_trajectory import describe_settling

            settling = report["hs_settling"]
            lines += ["", f"Hyper-search: {describe_settling(settling)}."]
            lines += [f"Warning: {settling['warning']}."] if settling.get("warning") else []
        lines += [""]
    return "\n".join(lines)
