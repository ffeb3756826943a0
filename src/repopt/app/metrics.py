"""Per-epoch metrics (JSON lines) and the PNG plots of the curves."""
from __future__ import annotations

import json
from pathlib import Path

from .._io import atomic_write, write_text


class MetricsLog:
    """Appends one JSON line per epoch; on resume, drops lines past the epoch being resumed from."""

    def __init__(self, path: Path, enabled: bool = True, keep_epochs: int = 0):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= keep_epochs] if keep_epochs else []
            text = "".join(json.dumps(r) + "\n" for r in kept)
            write_text(self.path, text)  # a crash here keeps the old lines

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a line cut short is dropped when read: the lines before it stay good
                from .checkpoint import CheckpointError

                raise CheckpointError(f"{self.path}: a line could not be appended ({e.strerror or e}); the lines "
                                      f"before it are kept") from None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file; a last line cut short (a process killed while appending) is dropped."""
    from .checkpoint import CheckpointError  # the run directory's files share one error for the CLI

    path = Path(path)
    if not path.is_file():
        return []
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a text file (edit or remove the file)") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # every record is an object: a line cut short never parses
                break
            record = None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}: line {i + 1} is not a JSON record (edit or remove the file)")
        records.append(record)
    return records


def plot_curves(runs: dict[str, Path], path: Path, quiet: bool = False) -> Path | None:
    """Train loss and test top-1 per epoch for each run, side by side. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no plot (pip install 'repopt[plot]')")
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, metrics_path in runs.items():
        rows = [r for r in read_metrics(metrics_path) if {"epoch", "train_loss", "test_top1"} <= r.keys()]
        if not rows:  # no run yet, or another version's records
            continue
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], label=label)
        tested = [r for r in rows if r.get("test_top1") is not None]  # --eval-every skips epochs
        ax_acc.plot([r["epoch"] for r in tested], [r["test_top1"] for r in tested], label=label, marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return Path(path)


def plot_scales_trajectory(records: list[dict], path: Path, title: str = "") -> Path:
    """The hyper-search's scales per epoch (repopt/search_trajectory.py records): left, how far all scales moved each
    epoch and how far they are from their initial values; right, each conv's mean scale per branch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_move, ax_mean) = plt.subplots(1, 2, figsize=(11, 4))
    moved = [r for r in records if r.get("moved")]  # None (epoch 0) and 0 have no place on the log axis
    ax_move.plot([r["epoch"] for r in moved], [r["moved"] for r in moved], marker=".", label="moved this epoch")
    initial = [r for r in records if r.get("from_initial")]
    ax_move.plot([r["epoch"] for r in initial], [r["from_initial"] for r in initial], marker=".",
                 label="from the initial values")
    ax_move.set(xlabel="epoch", ylabel="relative change of all scales", title="how much the scales move")
    if moved or initial:
        ax_move.set_yscale("log")
    colors: dict[str, str] = {}  # one colour per branch, labelled once
    for name, branches in (records[0]["layers"] if records else {}).items():
        for branch in branches:
            label = None if branch in colors else branch
            color = colors.setdefault(branch, f"C{len(colors)}")
            points = [(r["epoch"], r["layers"][name][branch]["mean"]) for r in records
                      if branch in r["layers"].get(name, {})]
            ax_mean.plot(*zip(*points), color=color, lw=0.8, alpha=0.7, label=label)
    ax_mean.set(xlabel="epoch", ylabel="mean scale (one line per conv)", title="per conv and branch")
    for ax in (ax_move, ax_mean):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return Path(path)

