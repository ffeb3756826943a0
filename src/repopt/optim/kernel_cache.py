"""Building the native kernels once per machine, into a cache that is safe to load code from.

A shared library is code: whoever can write the file, or the directory that holds it, decides what runs when it is
loaded (its constructors run on load). So a cached library is loaded only when the directory and the file are owned
by this user and writable by nobody else, and every directory above it is owned by this user or root and writable by
nobody else unless it is sticky like /tmp (else whoever can write there could swap the whole tree between the check
and the load); otherwise the kernels are built into a private directory (mode 0700 in the
system's temp dir) and a warning says so, once per process. The file name hashes everything the binary depends on:
the sources, the compiler command as given ($CC may be several words, e.g. "ccache gcc"), its version and target
triple (`-dumpmachine`), and the flags. When the OpenMP build fails and the plain one works, a marker beside the cache
remembers it, so that later processes (every DDP rank, every test worker) go straight to the plain build.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

from .._io import atomic_write, write_text

_said: set[str] = set()


def cache_dir() -> Path:
    """$REPOPT_CACHE_DIR, else $XDG_CACHE_HOME/repopt, else ~/.cache/repopt."""
    if os.environ.get("REPOPT_CACHE_DIR"):
        return Path(os.environ["REPOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repopt"


def compiler() -> list[str] | None:
    """The C compiler command, as words: $CC (shell-split), Python's own CC, cc, gcc or clang; None without one."""
    for command in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        words = shlex.split(command) if command else []
        if words and shutil.which(words[0]):
            return words
    return None


def unsafe_reason(path: Path, directory: bool) -> str | None:
    """Why code must not be loaded from `path` (None: it may): owned by another user, writable by group or others,
    or (a file) not a regular file (a link could point anywhere)."""
    try:
        st = os.stat(path) if directory else os.lstat(path)
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if directory and not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.getuid():
        return "is owned by another user"
    if st.st_mode & 0o022:
        return "is writable by other users"
    if directory:
        return _ancestors_reason(path)
    return None


def _ancestors_reason(path: Path) -> str | None:
    """Why a directory above `path` (as given, and with links resolved) lets another user replace it; None if none."""
    given = Path(os.path.abspath(path))
    for above in dict.fromkeys([*given.parents, *Path(os.path.realpath(path)).parents]):
        try:
            st = os.stat(above)
        except OSError as e:
            return f"lies under {above}, which cannot be inspected ({e.strerror})"
        if st.st_uid not in (0, os.getuid()):
            return f"lies under {above}, which is owned by another user"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"lies under {above}, which other users may write (and it is not sticky like /tmp)"
    return None


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def private_dir() -> Path:
    """<temp dir>/repopt-<uid>, mode 0700; refused (RuntimeError) when it exists and is not private to this user."""
    path = Path(tempfile.gettempdir()) / f"repopt-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"{path} could not be created ({e.strerror})") from e
    why = unsafe_reason(path, directory=True)
    if why is not None:
        raise RuntimeError(f"{path} {why}: it is not private to this user, so no kernel is built or loaded there")
    return path


def directory() -> Path:
    """cache_dir() when it is safe and writable, else private_dir() (with a warning, once)."""
    preferred = cache_dir()
    try:
        preferred.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = unsafe_reason(preferred, directory=True)
        if why is None and not os.access(preferred, os.W_OK):
            why = "is not writable"
    except OSError as e:
        why = f"could not be created ({e.strerror})"
    if why is None:
        return preferred
    fallback = private_dir()
    _say_once(f"repopt: the kernel cache {preferred} {why}; the native kernels are built in {fallback} instead")
    return fallback


def _identity(cc: list[str]) -> bytes:
    """What the binary depends on besides sources and flags: the command, the compiler's version and target."""
    def ask(flag: str) -> str:
        return subprocess.run([*cc, flag], capture_output=True, text=True, timeout=60).stdout

    return "\0".join([*cc, ask("--version"), ask("-dumpmachine")]).encode()


def _safe_existing(target: Path) -> tuple[bool, str | None]:
    """(is there a library at `target` that may be loaded, why not when one is there but may not)."""
    if not os.path.lexists(target):
        return False, None
    why = unsafe_reason(target, directory=False)
    return why is None, why


def build(name: str, sources: list[Path], headers: list[Path], flag_sets: list[list[str]]) -> Path:
    """The cached library built from `sources` with the first of `flag_sets` that compiles (built now if needed).

    Raises RuntimeError with one sentence when no compiler exists or no flag set compiles.
    """
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    text = b"".join(f.read_bytes() for f in [*sources, *headers]) + _identity(cc)
    base = directory()
    errors: list[str] = []
    for i, flags in enumerate(flag_sets):
        key = hashlib.sha256(text + "\0".join(flags).encode()).hexdigest()[:16]
        filename = f"{name}-{key}.so"
        marker = base / f"{filename}.failed"
        if i + 1 < len(flag_sets) and marker.exists() and unsafe_reason(marker, directory=False) is None:
            errors.append(marker.read_text())  # this set failed before while a later one worked: not retried
            continue
        target = base / filename
        ok, why = _safe_existing(target)
        if ok:
            return target
        if why is not None:  # a file we must not load: build in the private directory instead
            target = private_dir() / filename
            _say_once(f"repopt: {base / filename} {why}; not loaded, the native kernels are built in "
                      f"{target.parent} instead")
            ok, why = _safe_existing(target)
            if ok:
                return target
            if why is not None:  # in our own private directory: remove it and rebuild
                target.unlink()
        try:
            _compile(cc, flags, sources, target)
        except RuntimeError as e:
            errors.append(str(e))
            continue
        for j in range(i):  # the earlier sets failed where this one works: remember it for the next processes
            failed_key = hashlib.sha256(text + "\0".join(flag_sets[j]).encode()).hexdigest()[:16]
            failed = base / f"{name}-{failed_key}.so.failed"
            if not failed.exists():
                write_text(failed, errors[j] + "\n")
        return target
    raise RuntimeError(errors[-1].strip())


def _compile(cc: list[str], flags: list[str], sources: list[Path], target: Path) -> None:
    """Compile `sources` into `target` atomically (repopt._io.atomic_write: a temporary beside it, then a rename),
    with mode 0755: the cache check refuses files that others may write."""
    def write(tmp: Path) -> None:
        # the flags after the sources: libraries (-lm) must follow what uses them
        done = subprocess.run([*cc, *map(str, sources), *flags, "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{' '.join(cc)} could not compile {', '.join(f.name for f in sources)}: {first}")
        os.chmod(tmp, 0o755)

    atomic_write(target, write)
