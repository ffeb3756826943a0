"""The run directory's own files after a crash: temporaries a killed writer left behind, a metrics line cut short
while appending, and the metrics file rewritten on resume (never half-written)."""
import json
import os
import subprocess
import sys

import pytest

from repopt._io import atomic_write
from repopt.app.checkpoint import CheckpointError
from repopt.app.metrics import MetricsLog, read_metrics


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_removes_temporaries_of_dead_writers_only(tmp_path):
    target = tmp_path / "checkpoint.pt"
    stale = tmp_path / f".checkpoint.tmp{_dead_pid()}-0.pt"
    live = tmp_path / f".checkpoint.tmp{os.getppid()}-0.pt"  # a running process: maybe writing right now
    other = tmp_path / f".metrics.tmp{_dead_pid()}-0.jsonl"  # another file's temporary: not ours to judge
    similar = tmp_path / f".checkpoint.tmp{_dead_pid()}-0.json"  # checkpoint.json's, not checkpoint.pt's
    for f in (stale, live, other, similar):
        f.write_text("partial")
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert not stale.exists() and live.exists() and other.exists() and similar.exists()


def test_a_metrics_line_cut_short_by_a_crash_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "top1": 50.0}) + "\n" + '{"epoch": 2, "to')
    assert read_metrics(path) == [{"epoch": 1, "top1": 50.0}]


def test_a_broken_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_metrics(path)


def test_resume_rewrites_the_metrics_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [{"epoch": e, "top1": float(e)} for e in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    before = path.read_text()

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", disk_full)
    with pytest.raises(OSError):
        MetricsLog(path, keep_epochs=2)
    monkeypatch.undo()
    assert path.read_text() == before  # the failed rewrite left the old lines
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # and no temporary
    MetricsLog(path, keep_epochs=2)
    assert read_metrics(path) == lines[:2]
