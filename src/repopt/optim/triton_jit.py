"""The @triton.jit kernels behind triton_kernels.py (this module imports triton; triton_kernels imports it lazily).

Every kernel runs one program per block of BLOCK elements of one weight. The block table (one row of BLOCK_FIELDS per
program, int32 or, with INDEX64, int64) names the weight, the block's first element, and where that element lies (its
row and its column in the row), computed on the host. Per element only 32-bit index math remains, relative to the
block: the row and tap come from two divisions by per-weight constants done as a multiply-high, an add and a shift
(`_udiv`), with no integer division instruction, and the identity's diagonal from a per-row table of its column.
`meta` holds each weight's pointers, geometry and those division constants (triton_kernels._META).

Scalars come in a tensor `hyper` of the compute type (float64 weights: float64; else float32, as torch's opmath), so
that float64 runs in float64. Per element, the C kernels' arithmetic (kernels/*.c): tl.fma exactly where they call
fma(), correctly rounded sqrt and division, and every other operation rounded on its own: the launches pass
enable_fp_fusion=False, so the PTX holds mul.rn/add.rn, which ptxas does not contract into FMAs.
"""
import triton
import triton.language as tl

BLOCK_FIELDS = 4  # which weight, first element, its row, its column in the row (the literal 4 in _where)


@triton.jit
def _udiv(n, magic, shift):
    """floor(n / d) for 0 <= n < 2^31 (uint32) with d's (magic, shift) from triton_kernels.magic: (umulhi(n, magic) +
    n) >> shift. The sum stays below 2^32 because n < 2^31."""
    return (tl.umulhi(n, magic) + n) >> shift


@triton.jit
def _u32(base, field: tl.constexpr):
    return tl.load(base + field).to(tl.uint32)


@triton.jit
def _where(meta_ptr, blocks_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr, INDEX64: tl.constexpr,
           VEC: tl.constexpr):
    """This program's weight (its metadata row), first element, lane mask, the table entry of each lane (relative to
    the block's first row) and whether a lane is the identity's diagonal element. VEC > 1: every weight of the launch
    has a multiple of VEC elements, so the mask is constant over VEC lanes and the loads can be vectorised."""
    if INDEX64:
        row = blocks_ptr + tl.program_id(0).to(tl.int64) * 4
    else:
        row = blocks_ptr + tl.program_id(0) * 4
    base = meta_ptr + tl.load(row) * NMETA
    start = tl.load(row + 1)
    numel = tl.load(base + 6)
    if VEC > 1:
        start = tl.multiple_of(start, VEC)
        numel = tl.multiple_of(numel, VEC)
    lane = tl.arange(0, BLOCK)
    mask = lane < tl.minimum(numel - start, BLOCK).to(tl.int32)
    c = (tl.load(row + 3).to(tl.int32) + lane).to(tl.uint32)  # column from the block's first row: < row_len + BLOCK
    k = _udiv(c, _u32(base, 16), _u32(base, 17))  # rows past the first
    col = c - k * _u32(base, 7)
    inner = _u32(base, 15)  # taps (contiguous) or channels (channels_last): the faster index within a row
    q = _udiv(col, _u32(base, 18), _u32(base, 19))
    tap = tl.where(tl.load(base + 11) != 0, q, col - q * inner)
    row0 = tl.load(row + 2)
    # the identity's diagonal element of each row: its column, from the per-row table (-1: none)
    diag_cols = tl.load(base + 9).to(tl.pointer_type(tl.int32)) + row0
    diag = col == tl.load(diag_cols + k, mask=mask, other=-1).to(tl.uint32)
    entry = (k * _u32(base, 8) + tap).to(tl.int32)
    return base, start, row0 * tl.load(base + 8), lane, mask, entry, diag


@triton.jit
def _ptr(base, field: tl.constexpr, DT: tl.constexpr):
    return tl.load(base + field).to(tl.pointer_type(DT))


@triton.jit
def _data(base, field: tl.constexpr, start, DT: tl.constexpr, VEC: tl.constexpr):
    """A weight-sized tensor's pointer at the block's first element (VEC > 1: 16-byte aligned, `takes` checked)."""
    ptr = _ptr(base, field, DT)
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr + start


@triton.jit
def _div(a, b, CT: tl.constexpr):
    """a / b rounded to nearest (float32's `/` may be approximate on a GPU; float64's is exact)."""
    if CT == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, CT: tl.constexpr):
    if CT == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _grad(g_ptr, lane, mask, scale_ptr, CT: tl.constexpr):
    """The gradient in the compute type, divided by GradScaler's scale where there is one (the launcher passes 1,
    and x / 1 == x, so skipping the division changes no bit). A power of two (what GradScaler keeps) is divided by
    as a product with its reciprocal, one multiply per element instead of a correctly rounded division: the exact
    quotient is the same real number, rounded once either way (the reciprocal of a power of two is exact down to
    2^-149)."""
    g = tl.load(g_ptr + lane, mask=mask, other=0).to(CT)
    scale = tl.load(scale_ptr).to(CT)
    if scale != 1:
        if CT == tl.float64:
            power_of_two = (scale.to(tl.int64, bitcast=True) & 0xFFFFFFFFFFFFF) == 0
        else:
            power_of_two = (scale.to(tl.int32, bitcast=True) & 0x7FFFFF) == 0
        if power_of_two:  # GradScaler's scales: 1 / s is exact, so g * (1 / s) rounds as g / s does
            g = g * _div(tl.full((), 1, CT), scale, CT)
        else:
            g = _div(g, scale, CT)
    return g


# The flags (maximize, weight decay, momentum, nesterov, amsgrad, a weight's first step) are read at run time from
# `hyper` / `meta`: each is one uniform branch per program, not per element, and one compiled variant serves every
# combination (what warm_up must compile is then known before GradScaler or the flags are seen).
@triton.jit
def sgd_kernel(meta_ptr, blocks_ptr, scale_ptr, inf_ptr, hyper_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr,
               INDEX64: tl.constexpr, VEC: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    # hyper: [lr, weight_decay, momentum, 1 - dampening, nesterov, maximize]
    if tl.load(inf_ptr) == 0:  # GradScaler found inf/nan: nothing is read or written
        base, start, entry0, lane, mask, entry, diag = _where(meta_ptr, blocks_ptr, NMETA, BLOCK, INDEX64, VEC)
        p_ptr = _data(base, 0, start, DT, VEC)
        p = tl.load(p_ptr + lane, mask=mask, other=0).to(CT)
        g = _grad(_data(base, 1, start, DT, VEC), lane, mask, scale_ptr, CT)
        d = tl.load(_ptr(base, 5, CT) + entry0 + entry, mask=mask, other=0) * g
        d = tl.where(diag, d + g, d)
        if tl.load(hyper_ptr + 5) != 0:
            d = -d
        wd = tl.load(hyper_ptr + 1)
        if wd != 0:
            d = tl.fma(p, wd, d)
        mom = tl.load(hyper_ptr + 2)
        if mom != 0:
            b_ptr = _data(base, 2, start, DT, VEC)
            if tl.load(base + 12) != 0:  # the buffer is new: it is the update
                b = d
            else:
                b = tl.fma(d, tl.load(hyper_ptr + 3), tl.load(b_ptr + lane, mask=mask, other=0).to(CT) * mom)
            tl.store(b_ptr + lane, b.to(DT), mask=mask)
            if tl.load(hyper_ptr + 4) != 0:
                d = tl.fma(b, mom, d)
            else:
                d = b
        tl.store(p_ptr + lane, tl.fma(d, -tl.load(hyper_ptr), p).to(DT), mask=mask)


@triton.jit
def adamw_kernel(meta_ptr, blocks_ptr, scale_ptr, hyper_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr,
                 INDEX64: tl.constexpr, VEC: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    # hyper: [1 - lr wd, 1 - beta1, beta2, 1 - beta2, eps, sqrt(1 - beta2^t), -lr / (1 - beta1^t), amsgrad, maximize]
    base, start, entry0, lane, mask, entry, diag = _where(meta_ptr, blocks_ptr, NMETA, BLOCK, INDEX64, VEC)
    w = tl.load(hyper_ptr + 1)
    eps = tl.load(hyper_ptr + 4)
    p_ptr, m_ptr, v_ptr = _data(base, 0, start, DT, VEC), _data(base, 2, start, DT, VEC), _data(base, 3, start, DT, VEC)
    p = tl.load(p_ptr + lane, mask=mask, other=0).to(CT) * tl.load(hyper_ptr)
    g = _grad(_data(base, 1, start, DT, VEC), lane, mask, scale_ptr, CT)
    if tl.load(hyper_ptr + 8) != 0:
        g = -g
    m = tl.load(m_ptr + lane, mask=mask, other=0).to(CT)
    if w < 0.5:  # torch's lerp
        m = tl.fma(w, g - m, m)
    else:
        m = tl.fma(w - 1, g - m, g)
    v = tl.fma(tl.load(hyper_ptr + 3) * g, g, tl.load(v_ptr + lane, mask=mask, other=0).to(CT) * tl.load(hyper_ptr + 2))
    tl.store(m_ptr + lane, m.to(DT), mask=mask)
    tl.store(v_ptr + lane, v.to(DT), mask=mask)
    if tl.load(hyper_ptr + 7) != 0:
        vmax_ptr = _data(base, 4, start, DT, VEC)
        vmax = tl.load(vmax_ptr + lane, mask=mask, other=0).to(CT)
        vmax = tl.where((vmax > v) | (vmax != vmax), vmax, v)
        tl.store(vmax_ptr + lane, vmax.to(DT), mask=mask)
        v = vmax
    s = _div(_sqrt(v, CT), tl.load(hyper_ptr + 5), CT)
    u = tl.zeros_like(s)
    coef = _ptr(base, 5, CT) + entry0
    plane = tl.load(base + 14)  # rows * taps: one branch's table
    for b in range(0, tl.load(base + 13)):
        c = tl.load(coef + b * plane + entry, mask=mask, other=0)
        on = c != 0  # off the branch's support c = 0 adds nothing
        u += tl.where(on, _div(c * c, tl.where(on, c * s + eps, 1), CT), 0)
    u = tl.where(diag, u + _div(tl.full(s.shape, 1, CT), s + eps, CT), u)
    tl.store(p_ptr + lane, tl.fma(tl.load(hyper_ptr + 6) * m, u, p).to(DT), mask=mask)


@triton.jit
def lion_kernel(meta_ptr, blocks_ptr, hyper_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr, INDEX64: tl.constexpr,
                VEC: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    # hyper: [1 - lr wd, -lr, beta1, 1 - beta1, beta2, 1 - beta2, weight decay != 0, maximize]
    base, start, entry0, lane, mask, entry, diag = _where(meta_ptr, blocks_ptr, NMETA, BLOCK, INDEX64, VEC)
    p_ptr, m_ptr = _data(base, 0, start, DT, VEC), _data(base, 2, start, DT, VEC)
    p = tl.load(p_ptr + lane, mask=mask, other=0).to(CT)
    if tl.load(hyper_ptr + 6) != 0:
        p = p * tl.load(hyper_ptr)
    g = tl.load(_data(base, 1, start, DT, VEC) + lane, mask=mask, other=0).to(CT)
    if tl.load(hyper_ptr + 7) != 0:
        g = -g
    m = tl.load(m_ptr + lane, mask=mask, other=0).to(CT)
    c = tl.fma(g, tl.load(hyper_ptr + 3), m * tl.load(hyper_ptr + 2))
    sign = tl.where(c > 0, 1, tl.where(c < 0, -1, c))  # torch.sign: 0 stays 0, NaN stays NaN
    L = tl.load(_ptr(base, 5, CT) + entry0 + entry, mask=mask, other=0)
    L = tl.where(diag, L + 1, L)
    tl.store(p_ptr + lane, tl.fma(L * sign, tl.load(hyper_ptr + 1), p).to(DT), mask=mask)
    tl.store(m_ptr + lane, tl.fma(g, tl.load(hyper_ptr + 5), m * tl.load(hyper_ptr + 4)).to(DT), mask=mask)


@triton.jit
def where_probe_kernel(meta_ptr, blocks_ptr, out_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr,
                       INDEX64: tl.constexpr):
    """The index arithmetic alone, for tests: per lane of program 0, its element, table entry and diagonal flag (-1
    where masked), so that blocks of a weight of 2^31 elements or more can be checked without allocating it."""
    base, start, entry0, lane, mask, entry, diag = _where(meta_ptr, blocks_ptr, NMETA, BLOCK, INDEX64, 1)
    tl.store(out_ptr + lane, tl.where(mask, start.to(tl.int64) + lane, -1))
    tl.store(out_ptr + BLOCK + lane, tl.where(mask, entry0.to(tl.int64) + entry, -1))
    tl.store(out_ptr + 2 * BLOCK + lane, tl.where(mask, diag.to(tl.int64), -1))


def kernels():
    return sgd_kernel, adamw_kernel, lion_kernel


__all__ = ["BLOCK_FIELDS", "kernels", "triton", "where_probe_kernel"]
