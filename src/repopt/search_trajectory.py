"""How the hyper-search's scales move, epoch by epoch, and whether they have settled by the end.

Users of the YOLOv6 port saw the HS model's accuracy oscillate (its issue 860) and scales that barely left their
initial values when the search was short (issue 971). A search records, after every epoch, per conv and branch the
scales' mean and spread and how far they moved (relative change of the vector since the previous epoch, and since
the initial values), in RUN/scales_trajectory.jsonl; `settling(records)` judges the end of the run by the share of
the scales' whole path (all scales as one vector S, each epoch's relative step ||S_e - S_(e-1)|| / ||S_(e-1)||)
travelled in its last fifth:

    share = sum of the steps over the last fifth of the epochs / sum of the steps over all epochs

a path length, so an oscillation counts as much as a drift. The warmup + cosine schedule gives the last fifth of a
run 1.3 % of its learning-rate integral (0.5 * (0.2 - sin(0.8 pi) / pi) / 0.5); at steady gradients the scales would
travel about that share there. Above SETTLED_BELOW (5 %, four times that) they are still moving faster than the
decaying rate explains (their gradient has not shrunk, or the run is so short that its last fifth is a large part of
its steps): they have not settled, and the search warns. How far they are from their initial values is reported
beside it (short searches barely change the rule-of-thumb initialization: issue 971).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from ._io import write_text
from .scales import load_scales, save_scales

TRAJECTORY = "scales_trajectory.jsonl"
INITIAL = "scales_initial.safetensors"
LAST_FRACTION = 0.2    # "the last epochs": the last fifth of the run (at least one epoch)
SETTLED_BELOW = 0.05   # the most of the whole path that may lie in that fifth (see the module's docstring)
MIN_JUDGED_EPOCHS = 2  # with one epoch the "last fifth" is the whole path: nothing to judge


def _flat(scales) -> dict[tuple[str, str], torch.Tensor]:
    return {(name, branch): t.detach().double().reshape(-1).cpu() for name, entry in scales.items()
            for branch, t in entry.items()}


def _relative(new: dict, old: dict | None, keys=None) -> float | None:
    """||new - old|| / ||old|| over `keys` (all keys of new by default); None without `old`."""
    if old is None:
        return None
    keys = list(new) if keys is None else keys
    diff = math.sqrt(sum(float((new[k] - old[k]).square().sum()) for k in keys if k in old))
    norm = math.sqrt(sum(float(old[k].square().sum()) for k in keys if k in old))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def trajectory_record(epoch: int, scales, previous=None, initial=None) -> dict:
    """One line of the trajectory: per conv and branch mean, std, `moved` (since `previous`) and `from_initial`,
    and the same two over all scales."""
    now = _flat(scales)
    prev, init = (_flat(s) if s is not None else None for s in (previous, initial))
    layers: dict[str, dict] = {}
    for (name, branch), v in now.items():
        layers.setdefault(name, {})[branch] = {
            "mean": float(v.mean()), "std": float(v.std()) if v.numel() > 1 else 0.0,
            "moved": _relative(now, prev, [(name, branch)]), "from_initial": _relative(now, init, [(name, branch)])}
    return {"epoch": epoch, "moved": _relative(now, prev), "from_initial": _relative(now, init), "layers": layers}


class ScalesTrajectory:
    """Writes FOLDER/scales_trajectory.jsonl for a hyper-search: epoch 0 (the initial scales) when it starts, then
    `record(epoch, hs_model)` after each epoch. A resumed run keeps the lines up to `start_epoch` and measures from
    the model as resumed; the initial scales are kept in FOLDER/scales_initial.safetensors for `from_initial`."""

    def __init__(self, folder: str | os.PathLike, hs_model: nn.Module, start_epoch: int = 0, enabled: bool = True):
        from .search import extract_scales

        self.path, self.enabled = Path(folder) / TRAJECTORY, enabled
        if not enabled:
            return
        self._previous = extract_scales(hs_model)
        initial_path = Path(folder) / INITIAL
        if start_epoch == 0:
            save_scales(self._previous, initial_path)
            self._initial = self._previous
            write_text(self.path, json.dumps(trajectory_record(0, self._previous, None, self._previous)) + "\n")
        else:
            self._initial = load_scales(initial_path) if initial_path.is_file() else None
            kept = [r for r in read_trajectory(self.path) if r["epoch"] <= start_epoch]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def record(self, epoch: int, hs_model: nn.Module) -> None:
        if not self.enabled:
            return
        from .search import extract_scales

        scales = extract_scales(hs_model)
        line = json.dumps(trajectory_record(epoch, scales, self._previous, self._initial))
        with open(self.path, "a") as f:  # a line cut short by a crash is dropped when read
            f.write(line + "\n")
        self._previous = scales


def read_trajectory(path: str | os.PathLike) -> list[dict]:
    """The records of a trajectory file (or of the run directory holding it); a last line cut short is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAJECTORY
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON record") from None
    return records


def settling(records: list[dict], last_fraction: float = LAST_FRACTION, threshold: float = SETTLED_BELOW) -> dict:
    """How much the scales still moved over the last `last_fraction` of the epochs (the summed relative steps of
    all scales, their share of the whole path, and the conv/branch that moved most there), how far they ended from
    their initial values, and the verdict with its one-sentence warning (None when they settled)."""
    trained = [r for r in records if r["epoch"] > 0 and r.get("moved") is not None]
    if not trained:
        return {"epochs": 0, "settled": None, "warning": None}
    last = trained[-1]["epoch"]
    if last < MIN_JUDGED_EPOCHS:
        return {"epochs": last, "settled": None, "warning": None}
    window = max(1, math.ceil(last * last_fraction))
    tail = [r for r in trained if r["epoch"] > last - window]
    path, moved = sum(r["moved"] for r in trained), sum(r["moved"] for r in tail)
    share = moved / path if path > 0 else 0.0
    part = window / last
    schedule = part - math.sin(math.pi * part) / math.pi  # the cosine schedule's share of the rate in that part
    per_branch: dict[str, float] = {}
    for r in tail:
        for name, branches in r["layers"].items():
            for branch, s in branches.items():
                per_branch[f"{name} {branch}"] = per_branch.get(f"{name} {branch}", 0.0) + (s["moved"] or 0.0)
    most = max(per_branch, key=per_branch.get)
    settled = share <= threshold
    warning = None if settled else (
        f"the hyper-search's scales have not settled: over the last {window} of {last} epochs they still travelled "
        f"{share:.0%} of their whole path (settled: at most {threshold:.0%}; the cosine schedule gives those "
        f"epochs {schedule:.1%} of its learning rate; most: {most}), so search longer (more --epochs)")
    return {"epochs": last, "window_epochs": window, "moved_last": moved, "path": path, "share_last": share,
            "schedule_share_last": schedule, "threshold": threshold, "most_moved": most, "most_moved_last": per_branch[most],
            "from_initial": trained[-1].get("from_initial"), "settled": settled, "warning": warning}


def describe_settling(report: dict) -> str:
    """The one line a search prints at its end (the warning, when there is one, comes apart)."""
    if not report.get("epochs"):
        return "no trajectory of the scales recorded"
    if report.get("settled") is None:
        return (f"scales not judged: {report['epochs']} epoch(s) is too short to tell whether they settled (at least "
                f"{MIN_JUDGED_EPOCHS})")
    initial = "" if report["from_initial"] is None else f", {report['from_initial']:.2%} from their initial values"
    return (f"scales moved {report['moved_last']:.3%} over the last {report['window_epochs']} of {report['epochs']} "
            f"epochs, {report['share_last']:.1%} of their whole path ({'settled' if report['settled'] else 'not settled'}"
            f": at most {report['threshold']:.0%}){initial}")
