"""The multi-tensor Triton kernels (repopt/optim/triton_kernels.py), run here on CPU tensors by Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py; on a GPU they compile): taken when asked, equal to the eager paths bit for bit
(the interpreter rounds each operation, fma included, as the eager path on AVX2/AVX-512 does; AdamW given a correctly
rounded sqrt, as in test_native.py), many weights in one launch, and a clear refusal where they cannot run; float16 and
bfloat16 weights against the float32 path rounded at each store; the index arithmetic (exact division by constants,
the INDEX64 variant around element 2^31); the device guard; warm_up. The float64 proofs (tests/test_equivalence.py,
cases "... triton") and the AMP skips (tests/test_amp_skip.py) run through them too. What only compiling shows is
bench/triton_compile_check.py's (CI). Skipped where triton is not installed (pip install 'repopt[triton]')."""
import math

import pytest
import torch
from torch import nn

from repopt import RepOptAdamW, RepOptLion, RepOptSGD
from repopt.optim import triton_kernels

from test_native import ADAPTIVE, FLAGS, SHAPES, TORCH_FUSES, _branch_set, _correctly_rounded_sqrt

pytestmark = pytest.mark.skipif(triton_kernels.usable(torch.device("cpu")) is not None,
                                reason=str(triton_kernels.usable(torch.device("cpu"))))


def _run_all(mults, flags, dtype, channels_last, path, optimizer, steps=2, seed=0):
    """Several weights in one optimizer (one launch per step on the Triton path)."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ws = [nn.Parameter(torch.randn(m.geometry.weight_shape, generator=g, dtype=dtype).contiguous(memory_format=fmt))
          for m in mults]
    kw = dict(native=False, triton=path == "triton")
    opt = optimizer(ws, grad_mults=dict(zip(ws, mults)), **{"lr": 0.1, **flags}, **kw)
    for _ in range(steps):
        for w in ws:
            w.grad = torch.randn(w.shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
        opt.step()
    assert set(opt.path_counts) == {path if path == "triton" else ("blocks" if optimizer is RepOptSGD else "eager")}
    return [w.detach() for w in ws]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_step_matches_the_eager_path(monkeypatch, channels_last, dtype):
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES) if shape[0] < 70]  # 6 shapes, one launch
    for optimizer, flags in [(RepOptSGD, f) for f in FLAGS] + ADAPTIVE:
        with monkeypatch.context() as m:
            if optimizer is RepOptAdamW:
                m.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
            eager = _run_all(mults, flags, dtype, channels_last, "eager", optimizer)
        fast = _run_all(mults, flags, dtype, channels_last, "triton", optimizer)
        for a, b in zip(fast, eager):
            assert a.stride() == b.stride()
            if TORCH_FUSES:
                assert torch.equal(a, b), (optimizer.__name__, flags, (a != b).sum().item())
            else:
                assert torch.allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_wrong_table_fails_the_comparison(monkeypatch):
    """The comparison above can fail: the kernels read the tap table, and a doubled one changes the result."""
    mults = [_branch_set(8, 8, 3, 1, ("3x3", "1x1", "identity"), seed=2)]
    eager = _run_all(mults, FLAGS[0], torch.float64, False, "eager", RepOptSGD)
    table = type(mults[0]).tap_table
    monkeypatch.setattr(type(mults[0]), "tap_table", lambda self, *a, **k: table(self, *a, **k) * 2)
    broken = _run_all(mults, FLAGS[0], torch.float64, False, "triton", RepOptSGD)
    assert not torch.allclose(broken[0], eager[0], rtol=1e-6)


@pytest.mark.parametrize("cls", [RepOptSGD, RepOptAdamW, RepOptLion])
def test_triton_true_says_why_it_cannot_run(monkeypatch, cls):
    monkeypatch.delenv("TRITON_INTERPRET")
    w = nn.Parameter(torch.randn(4, 4, 3, 3))
    opt = cls([w], lr=0.1, grad_mults={w: _branch_set(4, 4, 3, 1, ("3x3", "identity"), seed=0)}, triton=True)
    w.grad = torch.randn(4, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"triton=True\): on CPU tensors the Triton kernels run only under "
                                           r"TRITON_INTERPRET=1"):
        opt.step()


def test_the_default_takes_triton_only_for_gpu_weights():
    w = nn.Parameter(torch.randn(4, 4, 3, 3))
    opt = RepOptSGD([w], lr=0.1, momentum=0.9, grad_mults={w: _branch_set(4, 4, 3, 1, ("3x3",), seed=0)})
    w.grad = torch.randn(4, 4, 3, 3)
    opt.step()
    assert "triton" not in opt.path_counts


def test_the_vectorised_variant_matches_the_eager_path():
    """Weights whose sizes are all multiples of 4 take the VEC=4 variant (aligned 16-byte accesses on a GPU); the
    6-shape launch above has a 63-element weight, so it takes VEC=1."""
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES[:2] + SHAPES[3:4])]
    assert triton_kernels.vector_width(torch.float32, [math.prod(m.geometry.weight_shape) for m in mults]) == 4
    for optimizer, flags in [(RepOptSGD, FLAGS[0]), (RepOptLion, ADAPTIVE[3][1])]:
        eager = _run_all(mults, flags, torch.float32, False, "eager", optimizer)
        fast = _run_all(mults, flags, torch.float32, False, "triton", optimizer)
        for a, b in zip(fast, eager):
            assert torch.equal(a, b) if TORCH_FUSES else torch.allclose(a, b, rtol=2e-5, atol=2e-6)


# ---- half precision ----------------------------------------------------------------------------------------------
def _to_bf16_truncating(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 as Triton's interpreter converts (the low 16 bits dropped; compiled Triton rounds to
    nearest even, which only a GPU run checks)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _half_run(mults, optimizer, flags, dtype, path, rounding=None, steps=3, seed=1):
    """Weights of `dtype` stepped by the Triton kernels (path "triton"), or the reference: the float32 eager path on
    float32 copies, with the weights and every state tensor rounded to `dtype` after each step (the kernels compute
    in float32 and round once, at the store)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [m.geometry.weight_shape for m in mults]
    start = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]
    work = torch.float32 if path == "eager" else dtype
    ws = [nn.Parameter(w.to(work)) for w in start]
    opt = optimizer(ws, grad_mults=dict(zip(ws, mults)), **{"lr": 0.1, **flags}, native=False,
                    triton=path == "triton")
    rnd = rounding or (lambda t: t.to(dtype))
    for step in range(steps):
        for w, grad in zip(ws, grads[step]):
            w.grad = grad.to(work)
        opt.step()
        if path == "eager":
            with torch.no_grad():
                for w in ws:
                    w.copy_(rnd(w).float())
                    for key, value in opt.state[w].items():
                        if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                            value.copy_(rnd(value).float())
    assert set(opt.path_counts) == {path if path == "triton" else ("blocks" if optimizer is RepOptSGD else "eager")}
    return [w.detach().to(dtype) if path == "eager" else w.detach() for w in ws]


HALF_CASES = [(RepOptSGD, FLAGS[0]), (RepOptSGD, FLAGS[2]), (RepOptSGD, FLAGS[4])] + ADAPTIVE[:2] + ADAPTIVE[3:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_match_the_float32_path_rounded_at_each_store(monkeypatch, dtype):
    """float16 weights: bit for bit the float32 eager path with weights and state rounded to float16 after each step
    (the interpreter rounds float16 as a GPU does). bfloat16: the same against a reference that truncates, as the
    interpreter's float32 -> bfloat16 conversion does (a GPU rounds to nearest: not checked here)."""
    mults = [_branch_set(*shape, seed=i) for i, shape in enumerate(SHAPES[:3] + SHAPES[5:6])]
    rounding = _to_bf16_truncating if dtype == torch.bfloat16 else None
    for optimizer, flags in HALF_CASES:
        with monkeypatch.context() as m:
            if optimizer is RepOptAdamW:
                m.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
            eager = _half_run(mults, optimizer, flags, dtype, "eager", rounding)
        fast = _half_run(mults, optimizer, flags, dtype, "triton")
        for a, b in zip(fast, eager):
            assert a.dtype == dtype
            if TORCH_FUSES:
                assert torch.equal(a, b), (optimizer.__name__, flags, (a != b).sum().item())
            else:
                assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)


def test_the_bfloat16_reference_can_fail():
    """Rounding bfloat16 to nearest (what compiled Triton does) is not what the interpreter does: the reference
    above would catch a kernel that rounded differently."""
    mults = [_branch_set(*SHAPES[0], seed=0)]
    fast = _half_run(mults, RepOptSGD, FLAGS[0], torch.bfloat16, "triton")
    nearest = _half_run(mults, RepOptSGD, FLAGS[0], torch.bfloat16, "eager", None)
    assert not torch.equal(fast[0], nearest[0])


# ---- index arithmetic ----------------------------------------------------------------------------------------------
def test_magic_division_is_exact_for_every_divisor_and_numerator_below_2_31():
    g = torch.Generator().manual_seed(0)
    divisors = list(range(1, 3000)) + torch.randint(1, 2 ** 31, (3000,), generator=g).tolist() + [2 ** 31 - 1]
    for d in divisors:
        m, s = triton_kernels.magic(d)
        assert 0 <= m < 2 ** 32
        top = 2 ** 31 - 1
        near = {0, 1, d - 1, d, d + 1, top, top - d, top // d * d, top // d * d - 1}
        for n in near | set(range(0, 4 * d, max(1, d // 3))):
            if 0 <= n <= top:
                assert ((n * m >> 32) + n) >> s == n // d, (d, n)


def test_a_tensor_of_2_31_elements_or_more_takes_the_int64_variant():
    assert not triton_kernels.index64([2 ** 31 - 1, 10])
    assert triton_kernels.index64([10, 2 ** 31])
    for kind in ("sgd", "adamw", "lion"):
        assert triton_kernels._variant(kind, torch.float32, [2 ** 31 + 5])["INDEX64"] is True
        assert triton_kernels._variant(kind, torch.float16, [2 ** 31 - 1])["INDEX64"] is False


def _probe(fields, numel, start, wide):
    """The kernels' index arithmetic (triton_jit._where) for the block at `start` of a virtual weight of `numel`
    elements with these layout fields: (element, table entry, diagonal flag) per lane, -1 where masked. Only the
    metadata, one block row and the diagonal table of the rows the block touches exist."""
    from repopt.optim import triton_jit

    rows, row_len, taps, diag_group, diag_centre, channels_last = fields
    block = triton_kernels.CONFIG[("sgd", torch.float32)][0]
    first_row = start // row_len
    diag = triton_kernels.diag_columns_of(fields, torch.arange(first_row, first_row + block // row_len + 2))
    meta = [0] * triton_kernels.NMETA
    inner = row_len // taps if channels_last else taps
    for name, value in dict(numel=numel, row_len=row_len, taps=taps, diag_centre=diag_centre,
                            channels_last=channels_last, inner=inner, diag_cols=diag.data_ptr() - 4 * first_row,
                            row_len_magic=triton_kernels.magic(row_len)[0],
                            row_len_shift=triton_kernels.magic(row_len)[1], inner_magic=triton_kernels.magic(inner)[0],
                            inner_shift=triton_kernels.magic(inner)[1]).items():
        meta[triton_kernels._META.index(name)] = value
    blocks = torch.cat([torch.zeros(1, 1, dtype=torch.int64),
                        triton_kernels.block_fields(row_len, torch.tensor([start]))], 1)
    out = torch.zeros(3 * block, dtype=torch.int64)
    triton_jit.where_probe_kernel[(1,)](torch.tensor(meta), blocks.to(torch.int64 if wide else torch.int32), out,
                                        NMETA=triton_kernels.NMETA, BLOCK=block, INDEX64=wide)
    e = torch.arange(start, start + block)
    row, col = e // row_len, e % row_len
    tap = col // (row_len // taps) if channels_last else col % taps
    expected = torch.cat([e, row * taps + tap, (col == triton_kernels.diag_columns_of(fields, row)).long()])
    expected = torch.where(torch.cat([e, e, e]) < numel, expected, -1)
    return out, expected


@pytest.mark.parametrize("channels_last", [0, 1])
def test_the_index_arithmetic_is_right_around_2_31_elements(channels_last):
    """Blocks just below, at and past element 2^31 and the last, partial block of a weight of more than 2^31
    elements (rows of 7 channels x 9 taps, with an identity), in the INDEX64 variant; the int32 variant gets the
    blocks past 2^31 wrong (their first element does not fit its block table)."""
    rows = 2 ** 31 // 63 + 40
    fields, numel = (rows, 63, 9, 7, 4, channels_last), rows * 63
    block = triton_kernels.CONFIG[("sgd", torch.float32)][0]
    for start in (2 ** 31 - block, 2 ** 31, (numel - 1) // block * block):
        out, expected = _probe(fields, numel, start, wide=True)
        assert torch.equal(out, expected), start
        assert out[2 * block:].max() == 1  # the block holds diagonal elements: the check covers them
    out, expected = _probe(fields, numel, 2 ** 31, wide=False)
    assert not torch.equal(out, expected)


# ---- the device guard ----------------------------------------------------------------------------------------------
def test_the_guard_enters_the_weights_device_and_its_current_stream(monkeypatch):
    """Without a GPU: torch.cuda's device and stream context managers recorded. Triton launches on torch's current
    device and that device's current stream, so entering both is what puts a cuda:1 launch on cuda:1 (that the
    kernel then really runs there is what only a GPU run shows)."""
    import contextlib

    entered = []

    @contextlib.contextmanager
    def record(kind, value):
        entered.append((kind, value))
        yield

    monkeypatch.setattr(torch.cuda, "device", lambda d: record("device", torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: f"stream of {torch.device(d)}")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: record("stream", s))
    with triton_kernels._on_device(torch.device("cuda", 1)):
        assert entered == [("device", torch.device("cuda", 1)), ("stream", "stream of cuda:1")]
    entered.clear()
    with triton_kernels._on_device(torch.device("cpu")):
        assert entered == []


def test_every_launch_runs_inside_the_guard_of_its_group(monkeypatch):
    """One launch per (device, dtype) group, each inside _on_device(that group's device)."""
    import contextlib

    events = []
    guard = triton_kernels._on_device

    @contextlib.contextmanager
    def on_device(device):
        events.append(("enter", device))
        with guard(device):
            yield
        events.append(("exit", device))

    launch = triton_kernels._launch
    monkeypatch.setattr(triton_kernels, "_on_device", on_device)
    monkeypatch.setattr(triton_kernels, "_launch", lambda kind, kernel, rows, dtype, device, args: (
        events.append(("launch", device, dtype)), launch(kind, kernel, rows, dtype, device, args)))
    mults = [_branch_set(*SHAPES[0], seed=0), _branch_set(*SHAPES[2], seed=1)]
    ws = [nn.Parameter(torch.randn(m.geometry.weight_shape, dtype=dt)) for m, dt in zip(mults, (torch.float32,
                                                                                                torch.float64))]
    opt = RepOptSGD(ws, lr=0.1, momentum=0.9, grad_mults=dict(zip(ws, mults)), native=False, triton=True)
    for w in ws:
        w.grad = torch.randn_like(w)
    opt.step()
    cpu = torch.device("cpu")
    assert [e[:2] for e in events] == [("enter", cpu), ("launch", cpu), ("exit", cpu)] * 2
    assert {events[1][2], events[4][2]} == {torch.float32, torch.float64}


# ---- warm_up: ready the code before the step changes anything --------------------------------------------------------
class _FakeCudaWeight:
    """What warm_up reads of a weight (dtype, device, size): it touches no tensor's data."""

    def __init__(self, numel=4096, dtype=torch.float32, index=0):
        self.dtype, self.device, self._numel = dtype, torch.device("cuda", index), numel

    def numel(self):
        return self._numel


@pytest.fixture
def fake_compile(monkeypatch):
    """warm_up on 'cuda' weights without a GPU: the guard is a no-op and the kernels' warmup is recorded (or made to
    raise `calls["raise"]`)."""
    import contextlib

    calls = {"warmup": [], "loaded": 0, "raise": None}

    class Compiled:
        def _init_handles(self):
            calls["loaded"] += 1

    def warmup(*args, grid, **kwargs):
        calls["warmup"].append((args, kwargs))
        if calls["raise"] is not None:
            raise calls["raise"]
        return Compiled()

    for kernel in triton_kernels._load():
        monkeypatch.setattr(kernel, "warmup", warmup, raising=False)
    monkeypatch.setattr(triton_kernels, "_on_device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(triton_kernels, "_ready", set())
    return calls


def test_warm_up_compiles_each_variant_once_from_dtypes_alone(fake_compile):
    weights = [_FakeCudaWeight(4096), _FakeCudaWeight(4095), _FakeCudaWeight(64, torch.float64)]
    triton_kernels.warm_up("sgd", {"lr": 0.1}, weights)
    assert len(fake_compile["warmup"]) == 2 and fake_compile["loaded"] == 2  # (float32, VEC 1), (float64, VEC 2)
    for args, kwargs in fake_compile["warmup"]:
        assert all(isinstance(a, torch.dtype) for a in args)  # no tensor is read: dtypes stand for the pointers
        assert kwargs["enable_fp_fusion"] is False
    assert {kw["VEC"] for _, kw in fake_compile["warmup"]} == {1, 2}
    triton_kernels.warm_up("sgd", {"lr": 0.1}, weights)
    assert len(fake_compile["warmup"]) == 2  # ready: nothing compiled again
    triton_kernels.warm_up("sgd", {"lr": 0.1}, [_FakeCudaWeight(2 ** 31)])
    assert fake_compile["warmup"][-1][1]["INDEX64"] is True and fake_compile["warmup"][-1][0][1] == torch.int64


@pytest.mark.parametrize("error, cause", [
    (RuntimeError("Failed to find C compiler. Please specify via CC environment variable."),
     "no working host C compiler"),
    (RuntimeError("Triton Error [CUDA]: the provided PTX was compiled with an unsupported toolchain."),
     "CUDA driver is too old"),
    (RuntimeError("PTXAS error: Internal Triton PTX codegen error"), "failed to compile"),
    (ValueError("something else"), "readying the kernel failed"),
])
def test_warm_up_names_the_cause_in_one_sentence(fake_compile, error, cause):
    from repopt.optim.paths import PathUnavailable

    fake_compile["raise"] = error
    with pytest.raises(PathUnavailable) as info:
        triton_kernels.warm_up("adamw", {"lr": 0.1}, [_FakeCudaWeight(index=1)])
    message = str(info.value)
    assert message.startswith("the Triton adamw kernel cannot run on cuda:1: ") and cause in message
    assert "\n" not in message and message.count(". ") == 0


def test_warm_up_refuses_an_unknown_kind_and_compiles_nothing_for_the_interpreter(fake_compile):
    with pytest.raises(ValueError, match="kind must be one of sgd, adamw, lion"):
        triton_kernels.warm_up("adam", {}, [])
    triton_kernels.warm_up("lion", {}, [nn.Parameter(torch.zeros(4, 4, 3, 3))])
    assert fake_compile["warmup"] == []


# ---- which tensors the kernels take ----------------------------------------------------------------------------------
def test_takes_one_signature_and_refuses_unaligned_vectors():
    mult = _branch_set(8, 8, 3, 1, ("3x3", "identity"), seed=0)
    p, g, buf = (torch.zeros(8, 8, 3, 3) for _ in range(3))
    assert triton_kernels.takes(p, g, mult, buf) and triton_kernels.takes(p, g, mult, None)
    assert not triton_kernels.takes(p, g, mult, buf.double())
    storage = torch.zeros(8 * 8 * 9 + 1)
    shifted = storage[1:].view(8, 8, 3, 3)  # 4 bytes past an aligned address: no 16-byte vectors
    assert not triton_kernels.takes(p, shifted, mult, buf)


def test_the_ptx_check_flags_contractible_approximate_and_integer_division_operations():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from triton_compile_check import ptx_problems

    ok = "\tmul.rn.f32 \t%r1, %r2, %r3;\n\tadd.rn.f64 \t%fd1, %fd2, %fd3;\n\tmad.lo.s32 \t%r4, %r5, %r6, %r7;\n" \
         "\tfma.rn.f32 \t%f1, %f2, %f3, %f4;\n\tdiv.rn.f32 \t%f1, %f2, %f3;\n\tsub.s64 \t%rd1, %rd2, %rd3;\n"
    assert ptx_problems(ok) == []
    bad = "\tmul.f32 \t%f1, %f2, %f3;\n\t@%p1 add.ftz.f32 \t%f1, %f2, %f3;\n\tsub.f16x2 \t%r1, %r2, %r3;\n" \
          "\tmad.f32 \t%f1, %f2, %f3, %f4;\n\tdiv.full.f32 \t%f1, %f2, %f3;\n\tdiv.s64 \t%rd1, %rd2, %rd3;\n" \
          "\t@!%p2 rem.u32 \t%r1, %r2, %r3;\n"
    assert len(ptx_problems(bad)) == 7


@pytest.mark.parametrize("scale", [2.0 ** 14, 3.0, 2.0 ** -3])
def test_a_grad_scale_divides_as_the_eager_path_does(monkeypatch, scale):
    """GradScaler's grad_scale inside the kernel: a power of two by a product with its exact reciprocal, any other
    scale by a correctly rounded division; both equal the eager path's p.grad / grad_scale bit for bit."""
    monkeypatch.setattr(torch.Tensor, "sqrt", _correctly_rounded_sqrt)
    mults = [_branch_set(*SHAPES[0], seed=0), _branch_set(*SHAPES[5], seed=1)]
    out = {}
    for path in ("eager", "triton"):
        g = torch.Generator().manual_seed(3)
        ws = [nn.Parameter(torch.randn(m.geometry.weight_shape, generator=g)) for m in mults]
        opt = RepOptAdamW(ws, lr=1e-2, grad_mults=dict(zip(ws, mults)), native=False, triton=path == "triton")
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        for _ in range(2):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g) * 1e3
            opt.step()
        assert set(opt.path_counts) == {path}
        out[path] = [w.detach() for w in ws]
    for a, b in zip(out["triton"], out["eager"]):
        assert torch.equal(a, b) if TORCH_FUSES else torch.allclose(a, b, rtol=2e-5, atol=2e-6)
