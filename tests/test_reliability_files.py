"""The run directory's own files after a crash: temporaries a killed writer left behind, a metrics line cut short
while appending, the metrics file rewritten on resume (never half-written), and a result.json that cannot mark the run
finished (torn, from an older version, or from other settings)."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_kit import run_cli, snapshot, temp_files

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


@pytest.mark.parametrize("text, line", [
    ('{"epoch": 1}\n[1, 2]\n{"epoch": 3}\n', 2),  # JSON, but not a record
    ('{"epoch": 1}\n7\n', 2),  # the last line too: a whole value, not one cut short
    (b'{"epoch": 1}\n\xff\xfe{"epoch": 2}\n', None),  # a disk error's bytes
])
def test_metrics_that_are_not_records_are_named(tmp_path, text, line):
    """Before issue 12 these crashed a resumed run with a traceback (AttributeError, UnicodeDecodeError)."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    what = f": line {line} is not a JSON record" if line else " is not a text file"
    with pytest.raises(CheckpointError, match=rf"metrics.jsonl{what} \(edit or remove the file\)"):
        MetricsLog(path, keep_epochs=1)


def test_a_full_disk_while_appending_a_metrics_line_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"epoch": 1})

    class FullDisk:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", lambda *args, **kwargs: FullDisk())
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: a line could not be appended \(No space left on "
                                              r"device\); the lines before it are kept"):
        log.write({"epoch": 2})
    monkeypatch.undo()
    assert read_metrics(path) == [{"epoch": 1}]


def test_plots_skip_records_without_the_curves(tmp_path):
    """Rows of another version's metrics (no train_loss / test_top1) are left out of the plot, not a KeyError."""
    pytest.importorskip("matplotlib")
    from repopt.app.metrics import plot_curves

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "train_loss": 1.5, "test_top1": 40.0}\n')
    assert plot_curves({"run": path}, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").stat().st_size > 0


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


# ---- result.json, the "finished" marker that `repopt search` and `repopt pipeline` skip a stage by ----------------
SEARCH = ["search", "--epochs", "1", "--image-size", "16", "--batch-size", "128"]


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "search"
    assert run_cli([*SEARCH, "--quiet", "--out", str(out)])[0] == 0
    return out


def _old_version(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "config"}  # before issue 12 a result held no settings


@pytest.mark.parametrize("spoil, why", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read (JSONDecodeError)"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "cannot be read (UnicodeDecodeError)"),
    (lambda p: p.write_text("[]"), "lacks everything"),
    (lambda p: p.write_text(json.dumps(_old_version(json.loads(p.read_text())))), "lacks config"),
    (lambda p: (p.parent / "scales.safetensors").unlink(), "has no scales.safetensors beside it"),
], ids=["torn", "not-utf8", "not-a-result", "older-version", "no-scales"])
def test_a_result_that_cannot_mark_the_run_finished_counts_as_unfinished(finished_search, tmp_path, spoil, why):
    """Re-running the command finishes the run again from its checkpoint (no epoch is trained again) and writes a
    good result.json; before issue 12 a torn file crashed the command with a traceback."""
    out = Path(shutil.copytree(finished_search, tmp_path / "search"))
    spoil(out / "result.json")
    code, stdout, err = run_cli([*SEARCH, "--out", str(out)])
    assert code == 0, err
    assert f"{out / 'result.json'} {why}: the run counts as unfinished" in stdout
    assert "epoch 1/1" not in stdout  # resumed after its last epoch: nothing trained again
    result = json.loads((out / "result.json").read_text())
    assert result["config"]["epochs"] == 1 and (out / "scales.safetensors").is_file()
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_a_finished_run_of_other_settings_is_refused(finished_search, tmp_path):
    """Before issue 12 `repopt search --epochs 2` (or a pipeline stage) silently reported the 1-epoch run."""
    out = Path(shutil.copytree(finished_search, tmp_path / "search"))
    before = snapshot(out)
    code, _, err = run_cli([*SEARCH[:2], "2", *SEARCH[3:], "--quiet", "--out", str(out)])
    assert code == 2 and err.count("\n") == 1, err
    assert "result.json was written by a run with epochs=1, but this command has epochs=2" in err
    assert snapshot(out) == before


def test_a_full_disk_while_result_json_is_written_is_one_sentence(finished_search, tmp_path, monkeypatch):
    """A full disk (or an I/O error) while a run writes its result, metrics, report or plots: one sentence that names
    the file, exit code 2, and the file as it was (before issue 12: an OSError traceback naming the temporary)."""
    out = Path(shutil.copytree(finished_search, tmp_path / "search"))
    (out / "result.json").write_text("{")  # torn: the re-run finishes the run and writes it again
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".result.tmp"):
            real(self, "{\"ha", **kwargs)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, _, err = run_cli([*SEARCH, "--quiet", "--out", str(out)])
    monkeypatch.undo()
    assert code == 2 and err == (f"repopt search: error: {out / 'result.json'} could not be written (No space left "
                                 f"on device); the previous file is left as it was\n"), err
    assert (out / "result.json").read_text() == "{" and not temp_files(out)


def test_search_output_is_checked_first_and_copied_atomically(finished_search, tmp_path, monkeypatch):
    """`repopt search -o FILE`: a FILE that cannot be written is refused before the search runs, and a copy that
    fails half-way leaves the FILE that was there (before issue 12: checked after the search, copied in place)."""
    out = tmp_path / "fresh"
    code, _, err = run_cli([*SEARCH, "--quiet", "--out", str(out), "-o", str(tmp_path / "no" / "s.safetensors")])
    assert code == 2 and "s.safetensors cannot be written (No such file or directory)" in err, err
    assert not out.exists()

    dest = tmp_path / "kept.safetensors"
    dest.write_bytes(b"the scales of an earlier search")
    real = shutil.copyfile

    def half_then_full(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", half_then_full)
    code, _, err = run_cli([*SEARCH, "--quiet", "--out", str(finished_search), "-o", str(dest)])
    monkeypatch.setattr(shutil, "copyfile", real)
    assert code == 2 and f"{dest} could not be written (No space left on device)" in err, err
    assert dest.read_bytes() == b"the scales of an earlier search" and not temp_files(tmp_path)
    assert run_cli([*SEARCH, "--quiet", "--out", str(finished_search), "-o", str(dest)])[0] == 0
    assert dest.read_bytes() == (finished_search / "scales.safetensors").read_bytes()
