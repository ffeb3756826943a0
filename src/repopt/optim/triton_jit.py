"""The @triton.jit kernels behind triton_kernels.py (this module imports triton; triton_kernels imports it lazily).

Every kernel runs one program per block of BLOCK elements of one weight; `which`/`start` name the weight and the first
element of each block, `meta` holds each weight's pointers and geometry (triton_kernels._META). Scalars come in a
tensor `hyper` of the compute type (float64 weights: float64; else float32, as torch's opmath), so that float64 runs
in float64. Per element, the C kernels' arithmetic (kernels/*.c): fma where torch's eager kernels fuse, correctly
rounded sqrt and division.
"""
import triton
import triton.language as tl


@triton.jit
def _where(meta_ptr, which_ptr, start_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr):
    """This program's weight (its metadata row), element offsets, mask, row and tap of each element, and whether it is
    the identity's diagonal element."""
    pid = tl.program_id(0)
    base = meta_ptr + tl.load(which_ptr + pid) * NMETA
    offs = tl.load(start_ptr + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(base + 6)
    row_len = tl.load(base + 7)
    taps = tl.load(base + 8)
    diag_group = tl.load(base + 9)
    last = tl.load(base + 11) != 0
    row = offs // row_len
    r = offs - row * row_len
    channels = row_len // taps
    tap = tl.where(last, r // channels, r % taps)
    channel = tl.where(last, r % channels, r // taps)
    diag = (diag_group > 0) & (channel == row % tl.maximum(diag_group, 1)) & (tap == tl.load(base + 10))
    return base, offs, mask, row * taps + tap, diag


@triton.jit
def _ptr(base, field: tl.constexpr, DT: tl.constexpr):
    return tl.load(base + field).to(tl.pointer_type(DT))


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
def _grad(base, offs, mask, scale_ptr, HAS_SCALE: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    g = tl.load(_ptr(base, 1, DT) + offs, mask=mask, other=0).to(CT)
    if HAS_SCALE:
        g = _div(g, tl.load(scale_ptr).to(CT), CT)
    return g


@triton.jit
def sgd_kernel(meta_ptr, which_ptr, start_ptr, scale_ptr, inf_ptr, hyper_ptr, NMETA: tl.constexpr,
               BLOCK: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    base, offs, mask, tap, diag = _where(meta_ptr, which_ptr, start_ptr, NMETA, BLOCK)
    mask = mask & (tl.load(inf_ptr + offs * 0) == 0)  # GradScaler found inf/nan: nothing is read or written
    lr = tl.load(hyper_ptr)
    wd = tl.load(hyper_ptr + 1)
    mom = tl.load(hyper_ptr + 2)
    keep = tl.load(hyper_ptr + 3)
    p_ptr = _ptr(base, 0, DT)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(CT)
    g = _grad(base, offs, mask, scale_ptr, HAS_SCALE, DT, CT)
    d = tl.load(_ptr(base, 5, CT) + tap, mask=mask, other=0) * g
    d = tl.where(diag, d + g, d)
    if MAXIMIZE:
        d = -d
    if HAS_WD:
        d = tl.fma(p, wd, d)
    if HAS_MOMENTUM:
        b_ptr = _ptr(base, 2, DT)
        b = tl.load(b_ptr + offs, mask=mask, other=0).to(CT)
        b = tl.where(tl.load(base + 12) != 0, d, tl.fma(d, keep, b * mom))  # first step: the buffer is the update
        tl.store(b_ptr + offs, b.to(DT), mask=mask)
        if NESTEROV:
            d = tl.fma(b, mom, d)
        else:
            d = b
    tl.store(p_ptr + offs, tl.fma(d, -lr, p).to(DT), mask=mask)


@triton.jit
def adamw_kernel(meta_ptr, which_ptr, start_ptr, scale_ptr, hyper_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr, DT: tl.constexpr,
                 CT: tl.constexpr):
    base, offs, mask, tap, diag = _where(meta_ptr, which_ptr, start_ptr, NMETA, BLOCK)
    decay = tl.load(hyper_ptr)
    w = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    keep2 = tl.load(hyper_ptr + 3)
    eps = tl.load(hyper_ptr + 4)
    bc2 = tl.load(hyper_ptr + 5)
    step = tl.load(hyper_ptr + 6)
    p_ptr, m_ptr, v_ptr = _ptr(base, 0, DT), _ptr(base, 2, DT), _ptr(base, 3, DT)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(CT) * decay
    g = _grad(base, offs, mask, scale_ptr, HAS_SCALE, DT, CT)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(CT)
    m = tl.where(w < 0.5, tl.fma(w, g - m, m), tl.fma(w - 1, g - m, g))  # torch's lerp
    v = tl.fma(keep2 * g, g, tl.load(v_ptr + offs, mask=mask, other=0).to(CT) * beta2)
    tl.store(m_ptr + offs, m.to(DT), mask=mask)
    tl.store(v_ptr + offs, v.to(DT), mask=mask)
    if AMSGRAD:
        vmax_ptr = _ptr(base, 4, DT)
        vmax = tl.load(vmax_ptr + offs, mask=mask, other=0).to(CT)
        vmax = tl.where((vmax > v) | (vmax != vmax), vmax, v)
        tl.store(vmax_ptr + offs, vmax.to(DT), mask=mask)
        v = vmax
    s = _div(_sqrt(v, CT), bc2, CT)
    u = tl.zeros_like(s)
    coef = _ptr(base, 5, CT) + tap
    plane = tl.load(base + 14) * tl.load(base + 8)  # rows * taps: one branch's table
    for b in range(0, tl.load(base + 13)):
        c = tl.load(coef + b * plane, mask=mask, other=0)
        on = c != 0  # off the branch's support c = 0 adds nothing
        u += tl.where(on, _div(c * c, tl.where(on, c * s + eps, 1), CT), 0)
    u = tl.where(diag, u + _div(tl.full(s.shape, 1, CT), s + eps, CT), u)
    tl.store(p_ptr + offs, tl.fma(step * m, u, p).to(DT), mask=mask)


@triton.jit
def lion_kernel(meta_ptr, which_ptr, start_ptr, hyper_ptr, NMETA: tl.constexpr, BLOCK: tl.constexpr,
                HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr):
    base, offs, mask, tap, diag = _where(meta_ptr, which_ptr, start_ptr, NMETA, BLOCK)
    # hyper: [1 - lr wd, -lr, beta1, 1 - beta1, beta2, 1 - beta2]
    p_ptr, m_ptr = _ptr(base, 0, DT), _ptr(base, 2, DT)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(CT)
    if HAS_WD:
        p = p * tl.load(hyper_ptr)
    g = tl.load(_ptr(base, 1, DT) + offs, mask=mask, other=0).to(CT)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(CT)
    c = tl.fma(g, tl.load(hyper_ptr + 3), m * tl.load(hyper_ptr + 2))
    sign = tl.where(c > 0, 1, tl.where(c < 0, -1, c))  # torch.sign: 0 stays 0, NaN stays NaN
    L = tl.load(_ptr(base, 5, CT) + tap, mask=mask, other=0)
    L = tl.where(diag, L + 1, L)
    tl.store(p_ptr + offs, tl.fma(L * sign, tl.load(hyper_ptr + 1), p).to(DT), mask=mask)
    tl.store(m_ptr + offs, tl.fma(g, tl.load(hyper_ptr + 5), m * tl.load(hyper_ptr + 4)).to(DT), mask=mask)


def kernels():
    return sgd_kernel, adamw_kernel, lion_kernel


__all__ = ["kernels", "triton"]
