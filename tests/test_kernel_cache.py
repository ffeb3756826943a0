"""The native kernels' cache (repopt/optim/kernel_cache.py) never loads a library that another user could have planted,
keys each build by everything the binary depends on, remembers a failed OpenMP build; the kernels never see tensors
that overlap in memory and keep every tensor they read alive for the whole call."""
import gc
import os
import subprocess
import weakref

import pytest
import torch
from torch import nn

from repopt import RepOptAdamW, RepOptLion, RepOptSGD
from repopt.optim import kernel_cache, native

from test_native import _branch_set

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The loader as in a new process, caching into tmp_path/cache; the private fallback in tmp_path/tmp."""
    def reset():
        monkeypatch.setattr(native, "_library", None)
        monkeypatch.setattr(native, "_build_error", None)
        monkeypatch.setattr(kernel_cache, "_said", set())

    reset()
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(kernel_cache.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return reset


def _planted_library(tmp_path, target):
    """A library whose constructor leaves a file behind when it is loaded, put where the real one would be."""
    source, mark = tmp_path / "planted.c", tmp_path / "planted-code-ran"
    source.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {\n'
                      f'    FILE *f = fopen("{mark}", "w"); if (f) fclose(f);\n}}\n')
    subprocess.run([*native._compiler(), "-shared", "-fPIC", str(source), "-o", str(target)], check=True)
    return mark


@pytest.mark.parametrize("where", ["directory writable by others", "file writable by others",
                                   "file owned by another user"])
def test_a_library_others_could_have_planted_is_never_loaded(fresh, tmp_path, where):
    real = native._build()  # learn the name the cache uses, then put a planted library under it
    cache = real.parent
    real.unlink()
    mark = _planted_library(tmp_path, real)
    if where == "directory writable by others":
        cache.chmod(0o777)
    elif where == "file writable by others":
        real.chmod(0o777)
    else:
        if os.getuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(real, 65534, 65534)
    fresh()
    with pytest.warns(RuntimeWarning, match="native kernels are built in"):
        assert native.available(), native.build_error()
    assert not mark.exists(), "the planted library was loaded"
    private = tmp_path / "tmp" / f"repopt-{os.getuid()}"
    assert any(private.glob("repopt_kernels-*.so"))


@pytest.mark.parametrize("mode,trusted", [(0o777, False), (0o775, False), (0o1777, True), (0o755, True)],
                         ids=["open parent", "group-writable parent", "sticky parent like /tmp", "private parent"])
def test_a_cache_under_a_directory_others_may_write_is_not_trusted(fresh, monkeypatch, tmp_path, mode, trusted):
    """Whoever may write a directory above the cache can rename the cache away and put another tree in its place
    between the check and the load; a sticky directory (/tmp) forbids renaming what others own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(shared / "repopt"))
    if trusted:
        assert native._build().parent == shared / "repopt"
        return
    with pytest.warns(RuntimeWarning, match=f"lies under {shared}, which other users may write"):
        built = native._build()
    assert built.parent == tmp_path / "tmp" / f"repopt-{os.getuid()}"


def test_a_link_to_the_cache_is_judged_by_both_paths(tmp_path):
    """A link is checked where it lies and where it points: either parent could swap the target."""
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o777)
    (private / "cache").mkdir(mode=0o700)
    (shared / "link").symlink_to(private / "cache")
    (private / "link").symlink_to(private / "cache")
    assert kernel_cache.unsafe_reason(private / "link", directory=True) is None
    assert "lies under" in kernel_cache.unsafe_reason(shared / "link", directory=True)
    (shared / "cache").mkdir(mode=0o700)
    (private / "to-shared").symlink_to(shared / "cache")
    assert "lies under" in kernel_cache.unsafe_reason(private / "to-shared", directory=True)


def test_the_compiler_command_may_be_several_words(fresh, monkeypatch):
    monkeypatch.setenv("CC", "env gcc")  # as CC="ccache gcc": a wrapper, then the compiler
    assert native._compiler() == ["env", "gcc"]
    wrapped = native._build()
    monkeypatch.setenv("CC", "gcc")
    fresh()
    assert native._build() != wrapped  # another command, another cache entry


def test_the_target_triple_is_part_of_the_cache_key(fresh, monkeypatch, tmp_path):
    fake = tmp_path / "cc-for-some-target"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-dumpmachine" ]; then echo "$FAKE_TRIPLE"; exit 0; fi\nexec gcc "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("FAKE_TRIPLE", "x86_64-linux-gnu")
    first = native._build()
    monkeypatch.setenv("FAKE_TRIPLE", "aarch64-linux-gnu")
    assert native._build() != first


def test_a_failed_openmp_build_is_remembered(fresh, monkeypatch):
    monkeypatch.setattr(native, "OPENMP_FLAGS", ["-fopenmp", "-lrepopt-no-such-library"])  # cannot link
    compiles = []
    run = subprocess.run

    def counting(args, *a, **k):
        if "-o" in args:
            compiles.append(args)
        return run(args, *a, **k)

    monkeypatch.setattr(subprocess, "run", counting)
    assert native.available(), native.build_error()
    assert len(compiles) == 2  # OpenMP tried, then the plain build
    fresh()
    compiles.clear()
    assert native.available(), native.build_error()
    assert compiles == []  # the next process neither retries OpenMP nor rebuilds


OVERLAP = [(RepOptSGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
           (RepOptAdamW, dict(lr=1e-2, weight_decay=0.05)), (RepOptLion, dict(lr=1e-3, weight_decay=0.1))]


@pytest.mark.parametrize("cls,kw", OVERLAP, ids=[c[0].__name__ for c in OVERLAP])
def test_a_gradient_that_overlaps_the_weight_is_read_before_it_is_written(cls, kw):
    """The kernels take restrict pointers: a gradient sharing memory with the weight (here shifted by one element,
    so that a one-pass update would read already-updated values) goes to an eager path that reads it all first."""
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=3)
    numel = 8 * 8 * 3 * 3

    def run(overlap: bool):
        g = torch.Generator().manual_seed(0)
        memory = torch.randn(numel + 1, generator=g, dtype=torch.float64)
        w = nn.Parameter(memory[1:].view(8, 8, 3, 3))
        opt = cls([w], grad_mults={w: mult}, **kw)
        for _ in range(2):
            grad = memory[:numel].view(8, 8, 3, 3)  # element k of the gradient is element k - 1 of the weight
            w.grad = grad if overlap else grad.clone()
            opt.step()
        return [w.detach(), *(t for t in opt.state[w].values() if t.ndim)]

    for a, b in zip(run(overlap=True), run(overlap=False)):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_every_tensor_a_kernel_reads_stays_alive_during_the_call(monkeypatch):
    """ctypes releases the GIL: another thread may drop the last reference to the gradient while the kernel runs."""
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=4)
    w = nn.Parameter(torch.randn(8, 8, 3, 3))
    opt = RepOptSGD([w], lr=0.1, momentum=0.9, grad_mults={w: mult}, native=True)
    w.grad = torch.randn(8, 8, 3, 3)
    alive, call = [], native._call

    def another_thread_drops_the_gradient(*args):
        ref = weakref.ref(w.grad)
        w.grad = None
        gc.collect()
        alive.append(ref() is not None)
        return call(*args) if alive[-1] else 0  # never run the kernel on freed memory

    monkeypatch.setattr(native, "_call", another_thread_drops_the_gradient)
    opt.step()
    assert alive == [True]
