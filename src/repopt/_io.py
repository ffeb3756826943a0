"""File output and file errors, for the whole package: the one atomic writer and the one-line error reasons.

A leaf module (it imports nothing from repopt), so that the library and the application can both use it without
import cycles.
"""
from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import threading
from pathlib import Path

_counter = itertools.count()
_counter_lock = threading.Lock()


def _temp_prefix(path: Path) -> str:
    return f".{path.stem}.tmp"


def _temp_path(path: Path) -> Path:
    """A new name beside `path` for a temporary (pid and a counter: unique across processes and threads)."""
    with _counter_lock:
        n = next(_counter)
    return path.with_name(f"{_temp_prefix(path)}{os.getpid()}-{n}{path.suffix}")


class WriteError(OSError):
    """`filename` could not be written (a full disk, an I/O error, ...); the file it would have replaced is as it was.
    Its text is one sentence that names the file, not the temporary."""

    def __init__(self, path: Path, cause: OSError, probed: bool = False):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.probed = probed  # found by check_writable, before any work

    def __str__(self) -> str:
        if self.probed:
            return f"{self.filename} cannot be written ({self.strerror}); nothing was done"
        return f"{self.filename} could not be written ({self.strerror}); the previous file is left as it was"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path), then rename it over `path`: a crash or a full disk never leaves `path` half-written.

    The temporary is fsync'ed before the rename and its folder after it, so that after a power loss `path` holds the
    old file or the new one, never a new name over blocks not yet written. The temporary file sits beside `path` and
    keeps its suffix (so writers that pick a format from the name, such as matplotlib, still work). Temporaries that
    a killed process left beside `path` (their pid no longer runs) are removed first. An OSError of the write
    becomes a WriteError naming `path`; other errors (torch.save's RuntimeError, ...) pass as they are. Returns
    `path`.
    """
    path = Path(path)
    _remove_stale_temporaries(path)
    tmp = _temp_path(path)
    try:
        write(tmp)
        _fsync_file(tmp)  # the data on disk before the name points at it: else a power loss can leave zeros
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # and the rename itself
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(folder: Path) -> None:
    """fsync a folder (its entries: the rename); skipped where the platform refuses it (Windows cannot open a
    folder, some file systems answer EINVAL): the file itself was already synced."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the rename is done and the data synced; a folder that refuses fsync cannot do better
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike) -> None:
    """Raise WriteError now if `path` could not be written later (its folder is missing or read-only, it is a
    folder): for outputs that are written only after minutes of work. Creates nothing that stays."""
    path = Path(path)
    probe = _temp_path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WriteError(path, e, probed=True) from e


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A copy of `src` at `dest`, atomically."""
    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path`, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | os.PathLike, obj) -> Path:
    """`obj` as indented JSON into `path`, atomically."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def _remove_stale_temporaries(path: Path) -> None:
    own = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)-\d+" + re.escape(path.suffix) + "$")
    try:
        candidates = [(p, own.match(p.name)) for p in path.parent.iterdir()]
    except OSError:
        return
    for tmp, match in candidates:
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:  # its writer is gone: a leftover of a crash, never read by anyone
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # alive (or not ours to probe): leave it


def is_safetensors(path: str | os.PathLike) -> bool:
    """Does the file start as safetensors does: an 8-byte little-endian header length, then the JSON header? Checked
    before any other format's magic bytes: the length's low byte can be anything, a pickle's 0x80 or a zip's "PK"."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    return head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def load_error_reason(e: BaseException) -> tuple[bool, str]:
    """(refused for safety?, one short line) from a torch.load error, whose text runs to several paragraphs."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return True, f"it asks to load {m.group(1)}, which could run code; weights-only loading refused it"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Weights only load failed" in text:  # the detail sits between torch's boilerplate lines
        lines = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
    if not lines:
        return False, "the file ends early" if isinstance(e, EOFError) else type(e).__name__
    return False, lines[0].split(". ")[0].rstrip(".")


def load_error_message(path, e: BaseException, what: str) -> str:
    """One sentence for a failed torch.load of `path`: refused (the file asks to run code) or not a readable `what`."""
    unsafe, reason = load_error_reason(e)
    return f"{path}: refused to load: {reason}" if unsafe else f"{path}: not a readable {what} ({reason})"


def write_error_reason(e: BaseException) -> str:
    """One short line for a failed write: OSError's strerror, or the first line of torch's / safetensors' text."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return re.sub(r" at path .*$", "", (str(e).splitlines() or [type(e).__name__])[0])
