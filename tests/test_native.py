"""The native CPU kernels (repopt/optim/native.py) of RepOptSGD, RepOptAdamW and RepOptLion: they build here when a C
compiler exists, equal the eager paths (the same rules in torch tensor ops) bit for bit on every flag, layout, dtype and
branch shape (AdamW: up to torch's sqrt, with a stated bound), compute the same bits in every instruction-set clone, and
fall back cleanly when they cannot build. The float64 proofs of tests/test_equivalence.py run through them too (the
default path)."""
import copy
import os
import shutil

import numpy as np

import pytest
import torch
from torch import nn

from repopt import BranchSet, RepOptAdamW, RepOptLion, RepOptSGD
from repopt.branches import ConvGeometry
from repopt.optim import kernel_cache, native

needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The loader as in a new process (nothing built or refused yet), caching into tmp_path/cache."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_build_error", None)
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(tmp_path / "cache"))


@needs_compiler
def test_the_kernel_builds_and_loads_where_a_compiler_exists():
    assert native.available(), native.build_error()


def _branch_set(out_c, in_c, k, groups, branches, seed):
    g = torch.Generator().manual_seed(seed)
    geometry = ConvGeometry(out_c, in_c, (k, k), groups=groups)
    scales = {b: torch.randn(out_c, generator=g) for b in branches}
    return BranchSet(geometry, scales, name=f"{out_c}x{in_c}x{k}x{k}/g{groups}")


# (out, in, kernel, groups, branches): the identity on plain, grouped and depthwise convs; rows longer than the
# kernel's on-stack period (64 * 25 taps); 1x1 and 7x7 kernels; a kernel without a centre-sized branch; a kernel
# longer than the period a row aims at and than the adaptive kernel's segment (17x17 = 289 taps)
SHAPES = [
    (8, 8, 3, 1, ("3x3", "1x1", "identity")),
    (12, 12, 3, 3, ("3x3", "1x1", "identity")),
    (6, 6, 3, 6, ("3x3", "identity")),
    (16, 64, 5, 1, ("5x5", "3x3", "1x1")),
    (70, 70, 5, 1, ("5x5", "1x1", "identity")),
    (9, 7, 1, 1, ("1x1", "1x1_2")),
    (5, 3, 7, 1, ("7x7", "1x3", "3x1")),
    (6, 6, 17, 1, ("17x17", "3x3", "identity")),
]
FLAGS = [
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-3, maximize=True),
    dict(momentum=0.0, weight_decay=1e-3),
    dict(momentum=0.0, maximize=True),
]


def _run(mult, flags, dtype, channels_last, native_path, steps=3, seed=0, optimizer=RepOptSGD):
    g = torch.Generator().manual_seed(seed)
    shape = mult.geometry.weight_shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    w = nn.Parameter(torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt))
    flags = {"lr": 0.1, **flags}
    opt = optimizer([w], grad_mults={w: mult}, native=native_path, **flags)
    for _ in range(steps):
        w.grad = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        opt.step()
    return w.detach()


# AdamW: decay, amsgrad + maximize, a large lerp weight (torch's other lerp formula) with a large eps; Lion: decay,
# maximize
ADAPTIVE = [
    (RepOptAdamW, dict(lr=1e-2, weight_decay=0.05)),
    (RepOptAdamW, dict(lr=1e-2, weight_decay=0.0, amsgrad=True, maximize=True)),
    (RepOptAdamW, dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-3, weight_decay=0.01)),
    (RepOptLion, dict(lr=1e-3, weight_decay=0.1)),
    (RepOptLion, dict(lr=1e-3, betas=(0.5, 0.9), maximize=True)),
]


# torch's CPU kernels round as the native kernels do (one fma where `add(x, alpha=a)`, lerp and addcmul fuse) in
# their AVX2 and AVX-512 builds; its baseline build fuses nothing, so elsewhere only a tolerance can hold
TORCH_FUSES = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _correctly_rounded_sqrt(self):
    """sqrt rounded to nearest (numpy's): torch's CPU sqrt is off by one unit in the last place for ~1 float32 in 6."""
    return torch.from_numpy(np.sqrt(self.detach().numpy()))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}g{s[3]}{'+id' * ('identity' in s[4])}")
@pytest.mark.parametrize("cases", [[(RepOptSGD, flags) for flags in FLAGS], ADAPTIVE], ids=["sgd", "adamw+lion"])
def test_native_step_matches_the_eager_path(monkeypatch, cases, shape, channels_last, dtype):
    """Bit for bit over three steps. AdamW's eager path is given a correctly rounded sqrt here (the native kernel's);
    with torch's own sqrt the next test states and checks the bound."""
    mult = _branch_set(*shape, seed=1)
    tol = dict(rtol=1e-12, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for optimizer, flags in cases:
        with monkeypatch.context() as m:
            if optimizer is RepOptAdamW:
                m.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
            eager = _run(mult, flags, dtype, channels_last, native_path=False, optimizer=optimizer)
        fast = _run(mult, flags, dtype, channels_last, native_path=True, optimizer=optimizer)
        assert fast.stride() == eager.stride()
        if TORCH_FUSES:
            assert torch.equal(fast, eager), (optimizer.__name__, flags, (fast != eager).sum().item())
        else:
            assert torch.allclose(fast, eager, **tol), (optimizer.__name__, flags, (fast - eager).abs().max().item())


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}g{s[3]}{'+id' * ('identity' in s[4])}")
def test_native_adamw_is_within_the_stated_bound_of_torch_sqrt(shape, dtype):
    """The bound (docs/reliability.md): one step from the same state, |native - eager| <= eps |p'| + 8 eps |p' - d p|,
    eps = finfo(dtype).eps, d = 1 - lr wd: the new weight to its last bit plus 8 eps of the step, from torch's sqrt
    rounding s = sqrt(v_hat) differently (measured worst: 0.99 of eps |p'| + 4 eps |step|)."""
    mult = _branch_set(*shape, seed=1)
    eps = torch.finfo(dtype).eps
    for _, flags in ADAPTIVE[:3]:
        g = torch.Generator().manual_seed(0)
        start = nn.Parameter(torch.randn(mult.geometry.weight_shape, generator=g, dtype=dtype))
        warm = RepOptAdamW([start], grad_mults={start: mult}, native=False, **flags)
        for _ in range(4):
            start.grad = torch.randn(start.shape, generator=g, dtype=dtype)
            warm.step()
        grad = torch.randn(start.shape, generator=g, dtype=dtype)
        after = []
        for native_path in (False, True):
            w = nn.Parameter(start.detach().clone())
            opt = RepOptAdamW([w], grad_mults={w: mult}, native=native_path, **flags)
            opt.load_state_dict(copy.deepcopy(warm.state_dict()))
            w.grad = grad.clone()
            opt.step()
            after.append(w.detach())
        eager, fast = after
        step = fast - start.detach() * (1 - flags["lr"] * flags["weight_decay"])
        bound = eps * (fast.abs() + 8 * step.abs())
        assert ((fast - eager).abs() <= bound).all(), (flags, ((fast - eager).abs() / bound).max().item())


@needs_compiler
def test_every_instruction_set_clone_computes_the_same_bits(monkeypatch, tmp_path):
    """The library is built with -ffp-contract=off and explicit fma(): the clone this CPU takes (AVX-512 where it has
    it), the AVX2+FMA clone (-DREPOPT_NO_AVX512) and the baseline build (-DREPOPT_NO_CLONES: what a CPU without AVX2
    runs) agree bit for bit, for all three kernels, float32 and float64 -- so results do not depend on the CPU."""
    cases = [(RepOptSGD, FLAGS[0]), (RepOptSGD, FLAGS[1]), *ADAPTIVE]
    shapes = [SHAPES[0], SHAPES[4]]

    def run_all():
        return [_run(_branch_set(*shape, seed=1), flags, dtype, False, native_path=True, optimizer=optimizer)
                for optimizer, flags in cases for shape in shapes for dtype in (torch.float32, torch.float64)]

    clones = run_all()
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "OPENMP_FLAGS", [])
    flags = native.FLAGS
    for define in ("-DREPOPT_NO_AVX512", "-DREPOPT_NO_CLONES"):
        monkeypatch.setattr(native, "_library", None)
        monkeypatch.setattr(native, "_build_error", None)
        monkeypatch.setattr(native, "FLAGS", flags + [define])
        assert native.available(), native.build_error()
        for a, b in zip(clones, run_all()):
            assert torch.equal(a, b), (define, (a != b).sum().item())


@needs_compiler
@pytest.mark.parametrize("optimizer", [RepOptAdamW, RepOptLion])
def test_adaptive_kernels_are_taken_and_a_wrong_table_fails(monkeypatch, optimizer):
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=7)
    flags = dict(ADAPTIVE[0][1] if optimizer is RepOptAdamW else ADAPTIVE[3][1])
    eager = _run(mult, flags, torch.float64, False, native_path=False, optimizer=optimizer)
    calls = []
    prepare = native.prepare_adaptive

    def doubled(p, m, kind):
        job, coef = prepare(p, m, kind)
        coef = coef * 2
        job.coef = coef.data_ptr()
        calls.append(coef)  # kept alive for the kernel
        return job, coef

    monkeypatch.setattr(native, "prepare_adaptive", doubled)
    broken = _run(mult, flags, torch.float64, False, native_path=True, optimizer=optimizer)
    assert calls and not torch.allclose(broken, eager, rtol=1e-6)


@needs_compiler
def test_native_path_is_taken_and_fails_the_check_when_the_multiplier_is_wrong(monkeypatch):
    """The comparison above can fail: an identity term dropped from the kernel's jobs breaks it."""
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=2)
    eager = _run(mult, FLAGS[0], torch.float64, False, native_path=False)
    calls = []
    prepare = native.prepare

    def without_identity(*args, **kwargs):
        job, table = prepare(*args, **kwargs)
        job.identity = 0.0
        calls.append(job)
        return job, table

    monkeypatch.setattr(native, "prepare", without_identity)
    broken = _run(mult, FLAGS[0], torch.float64, False, native_path=True)
    assert calls and not torch.allclose(broken, eager, rtol=1e-6)


@needs_compiler
@pytest.mark.parametrize("threads", ["openmp", "pthreads"])
def test_several_weights_and_threads_in_one_call(fresh_build, monkeypatch, tmp_path, threads):
    """Many weights of different shapes split over threads (the per-thread minimum lowered so small weights split),
    with the library built with OpenMP (torch's pool) and without it (POSIX threads)."""
    if threads == "pthreads":
        monkeypatch.setattr(native, "OPENMP_FLAGS", [])
    assert native.available(), native.build_error()
    monkeypatch.setattr(native, "ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    mults = [_branch_set(*s, seed=i) for i, s in enumerate(SHAPES)]

    def run(native_path):
        g = torch.Generator().manual_seed(5)
        ws = [nn.Parameter(torch.randn(m.geometry.weight_shape, generator=g, dtype=torch.float64)) for m in mults]
        opt = RepOptSGD(ws, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, native=native_path,
                        grad_mults=dict(zip(ws, mults)))
        for _ in range(3):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g, dtype=torch.float64)
            opt.step()
        return ws

    for a, b in zip(run(False), run(True)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)


def test_without_a_compiler_the_eager_path_runs_and_native_true_says_why(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert not native.available()
    assert "no C compiler" in native.build_error()
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=3)
    w = _run(mult, FLAGS[0], torch.float64, False, native_path=None)  # the default: silently eager
    assert torch.equal(w, _run(mult, FLAGS[0], torch.float64, False, native_path=False))
    with pytest.raises(RuntimeError, match="native kernel is unavailable .*no C compiler"):
        RepOptSGD([nn.Parameter(torch.zeros(2, 2, 3, 3))], lr=0.1, native=True)


@needs_compiler
def test_a_compile_error_is_reported_and_leaves_no_file(fresh_build, monkeypatch, tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", [bad])
    assert native.load() is None
    assert "could not compile broken.c" in native.build_error()
    assert list((tmp_path / "cache").iterdir()) == []


def test_repopt_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("REPOPT_NATIVE", "0")
    assert not native.available()
    calls = []
    monkeypatch.setattr(native, "sgd_step", lambda *a, **k: calls.append(a))
    mult = _branch_set(8, 8, 3, 1, ("3x3", "identity"), seed=4)
    _run(mult, FLAGS[0], torch.float32, False, native_path=None)
    assert not calls


@needs_compiler
def test_the_built_library_is_cached_per_source(fresh_build, monkeypatch, tmp_path):
    first = native._build()
    stamp = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == stamp  # no rebuild
    copy = tmp_path / "edited.c"
    shutil.copy(native.SOURCES[0], copy)
    copy.write_text(copy.read_text().replace('#include "common.h"', f'#include "{native.HEADERS[0]}"')
                    + "\n/* edited */\n")
    monkeypatch.setattr(native, "SOURCES", [copy, *native.SOURCES[1:]])
    assert native._build() != first  # another source, another file


@needs_compiler
def test_a_read_only_cache_falls_back_to_a_private_temp_dir(fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REPOPT_CACHE_DIR", str(blocker / "cache"))  # cannot be created: its parent is a file
    monkeypatch.setattr(kernel_cache.tempfile, "gettempdir", lambda: str(tmp_path))
    with pytest.warns(RuntimeWarning, match="could not be created.*built in"):
        built = native._build()
    assert built.parent == tmp_path / f"repopt-{os.getuid()}"
    assert built.parent.stat().st_mode & 0o077 == 0
    built.parent.chmod(0o777)  # somebody else could plant a library there: refused
    with pytest.raises(RuntimeError, match="not private to this user"):
        native._build()


def test_every_kernel_file_ships_in_the_wheel():
    """A non-editable install has only the files pyproject's package-data names: the kernel sources and headers must
    all match it, or the kernels would not build outside this checkout."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["repopt"]
    package = root / "src" / "repopt"
    for f in [*native.SOURCES, *native.HEADERS, *native.KERNELS.iterdir()]:
        rel = f.resolve().relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in package-data"


@needs_compiler
def test_tensor_subclasses_take_the_eager_path(monkeypatch):
    """A subclass (DTensor, a wrapper) may not own the memory data_ptr() names: the kernels never see one."""
    class Wrapped(torch.Tensor):
        pass

    w = nn.Parameter(torch.randn(8, 8, 3, 3, dtype=torch.float64))
    mult = _branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=8)
    opt = RepOptSGD([w], lr=0.1, momentum=0.9, grad_mults={w: mult})
    calls = []
    monkeypatch.setattr(native, "sgd_step", lambda *a, **k: calls.append(a))
    w.grad = torch.randn(8, 8, 3, 3, dtype=torch.float64).as_subclass(Wrapped)
    opt.step()
    assert not calls
    assert native.prepare(torch.zeros(8, 8, 3, 3).as_subclass(Wrapped), mult) is None


def test_disjoint_compares_the_byte_ranges_tensors_span():
    """The overlap check the kernels' restrict pointers rely on (native.disjoint, run for every target weight on every
    step): the range from a tensor's first to its last element, contiguous, channels_last or strided."""
    flat = torch.zeros(40, dtype=torch.float64)
    assert native.disjoint([flat[:10], flat[10:20], flat[20:]])
    assert not native.disjoint([flat[:10], flat[9:20]])  # one shared element
    assert not native.disjoint([flat[:20], flat[5:8]])  # one inside the other
    assert not native.disjoint([flat, flat])
    assert native.disjoint([flat[:10], flat[10:10], flat[10:]])  # an empty tensor spans nothing
    grid = flat.view(4, 10)
    assert native.disjoint([grid[:, :5], grid[3:, 5:]])  # elements 0..34 and 35..39
    assert not native.disjoint([grid[:, :5], grid[2:, 5:]])  # interleaved columns: their ranges overlap
    assert not native.disjoint([flat.view(torch.float32)[19:21], flat[10:11]])  # bytes, not elements
    w = torch.zeros(8, 6, 3, 3).to(memory_format=torch.channels_last)
    assert native.disjoint([w, torch.zeros_like(w), torch.zeros(8, 6, 3, 3)])
    assert not native.disjoint([w, w.as_strided((1,), (1,), w.numel() - 1)])  # its last element in memory
