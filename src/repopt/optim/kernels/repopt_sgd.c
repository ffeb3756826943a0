/* RepOptSGD's native CPU kernel: M * G and torch's SGD update in one pass over p, G and the momentum buffer.
 *
 * Built on first use by repopt/optim/native.py with the machine's C compiler (plain C, no torch headers, so it
 * compiles in seconds) and called through ctypes, which releases the GIL. Python passes one job per target
 * weight; the rows of all jobs are split evenly over threads (DEFINE_PARALLEL in common.h).
 *
 * A weight (C_out, C_in/groups, kh, kw) is seen as C_out rows of row_len = C_in/groups * taps elements (taps = kh*kw).
 * The multiplier of an element is table[row * taps + tap] (the tap table: the sum of alpha^2 over the branches that
 * cover the tap), plus `identity` on the identity branch's diagonal centre tap: input channel row % diag_group at tap
 * diag_centre (diag_group 0: no identity branch). Within a row the elements are ordered (channel, tap) in the
 * contiguous layout and (tap, channel) in channels_last.
 *
 * Per element, the operations of RepOptSGD's eager path (M * G in a scratch buffer, then torch's single-tensor SGD),
 * each rounded where torch rounds it; fma(a, b, c) = a * b + c rounded once is used exactly where torch's CPU kernels
 * (AVX2 / AVX-512 builds: `add(x, alpha=a)` is a fused multiply-add there) use one:
 *     d = m * g  (the identity's diagonal element: d = m * g + g);  d = maximize ? -d : d
 *     weight decay: d = fma(p, wd, d)
 *     momentum: b = first ? d : fma(d, 1 - dampening, momentum * b);  d = nesterov ? fma(b, momentum, d) : b
 *     p = fma(d, -lr, p)
 * The library is built with -ffp-contract=off, so the compiler fuses nothing else: the result is the same on every
 * CPU (and in every instruction-set clone) and equals the eager path bit for bit where torch's kernels are AVX2 or
 * AVX-512 (tests/test_native.py). float32 weights are computed in float32, float64 weights in float64.
 */
#include <math.h>

#include "common.h"

#define MAX_PERIOD 1024 /* the longest repeated multiplier a row builds on the stack (and the most taps a kernel has) */
/* The length a row's repeated multiplier aims at (whole kernels of taps, at least one): long enough for the inner loop
 * to run on full vectors, short enough that building it again for every row costs little next to the row (a 3x3
 * kernel over 2^k channels: 16 channels, 144 elements; at 1024 it was 576 and the step slower, docs/benchmarks.md) */
#define PERIOD 256

typedef struct {
    void *p, *g, *buf;     /* buf is NULL when momentum == 0 */
    const void *table;     /* rows x taps */
    int64_t rows, row_len, taps;
    int64_t diag_group, diag_centre;
    double identity;
    int64_t first;         /* the buffer is new this step: b = d */
    int64_t channels_last;
} repopt_job;

typedef struct {
    double lr, weight_decay, momentum, dampening;
    int64_t nesterov, maximize;
} repopt_hyper;

/* The update of n elements; D is the masked gradient of element k (an expression). The flags are loop invariants: each
 * case is its own loop so that every loop vectorises. */
#define UPDATE_LOOPS(T, FMA, D)                                                                                    \
    const T lr = (T)(-h->lr), wd = (T)h->weight_decay, mom = (T)h->momentum, keep = (T)(1.0 - h->dampening);     \
    const int decay = h->weight_decay != 0;                                                                        \
    if (b == 0) {                                                                                                  \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (D);                                                                                             \
            d = decay ? FMA(p[k], wd, d) : d;                                                                      \
            p[k] = FMA(d, lr, p[k]);                                                                               \
        }                                                                                                          \
    } else if (first) {                                                                                            \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (D);                                                                                             \
            d = decay ? FMA(p[k], wd, d) : d;                                                                      \
            b[k] = d;                                                                                              \
            p[k] = FMA(h->nesterov ? FMA(d, mom, d) : d, lr, p[k]);                                                \
        }                                                                                                          \
    } else if (h->nesterov) {                                                                                      \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (D);                                                                                             \
            d = decay ? FMA(p[k], wd, d) : d;                                                                      \
            T nb = FMA(d, keep, b[k] * mom);                                                                       \
            b[k] = nb;                                                                                             \
            p[k] = FMA(FMA(nb, mom, d), lr, p[k]);                                                                 \
        }                                                                                                          \
    } else {                                                                                                       \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (D);                                                                                             \
            d = decay ? FMA(p[k], wd, d) : d;                                                                      \
            T nb = FMA(d, keep, b[k] * mom);                                                                       \
            b[k] = nb;                                                                                             \
            p[k] = FMA(nb, lr, p[k]);                                                                              \
        }                                                                                                          \
    }

#define DEFINE_KERNELS(S, T, FMA)                                                                                  \
INLINE void span_##S(T *restrict p, const T *restrict g, T *restrict b, const T *restrict m, int64_t n,            \
                     const repopt_hyper *h, int first) {                                                           \
    UPDATE_LOOPS(T, FMA, m[k] * g[k])                                                                              \
}                                                                                                                  \
INLINE void fill_##S(T *restrict p, const T *restrict g, T *restrict b, T m, int64_t n, const repopt_hyper *h,    \
                     int first) {                                                                                  \
    UPDATE_LOOPS(T, FMA, m * g[k])                                                                                 \
}                                                                                                                  \
/* the identity's diagonal element: its branches' m * g, then + id * g (id = +-1: exact), as the eager path adds it */\
INLINE void diag_##S(T *restrict p, const T *restrict g, T *restrict b, T m, T id, const repopt_hyper *h,         \
                     int first) {                                                                                  \
    const int64_t n = 1;                                                                                           \
    UPDATE_LOOPS(T, FMA, m * g[k] + id * g[k])                                                                     \
}                                                                                                                  \
/* contiguous layout: the row's taps repeat every `taps` elements; they are repeated R times on the stack so that   \
 * the inner loop is long, and the period that holds the diagonal is cut around it */                             \
CLONES static void row_##S(const repopt_job *j, int64_t row, const repopt_hyper *h, int64_t diag, T sign) {        \
    T m[MAX_PERIOD];                                                                                               \
    int64_t taps = j->taps, channels = j->row_len / taps, r = PERIOD / taps, off = row * j->row_len;               \
    int first = (int)j->first;                                                                                     \
    if (r < 1) r = 1;                                                                                              \
    if (r > channels) r = channels;                                                                                \
    while (channels % r) --r;                                                                                      \
    int64_t period = r * taps;                                                                                     \
    const T *table = (const T *)j->table + row * taps;                                                             \
    for (int64_t t = 0; t < taps; ++t) m[t] = sign * table[t];                                                     \
    for (int64_t k = taps; k < period; k *= 2) /* doubling copies: no division per element */                      \
        memcpy(m + k, m, (size_t)(2 * k <= period ? k : period - k) * sizeof(T));                                  \
    T *p = (T *)j->p + off, *b = j->buf ? (T *)j->buf + off : 0;                                                   \
    const T *g = (const T *)j->g + off;                                                                            \
    for (int64_t s = 0; s < j->row_len; s += period) {                                                             \
        if (diag >= s && diag < s + period) {                                                                      \
            int64_t at = diag - s;                                                                                 \
            span_##S(p + s, g + s, b ? b + s : 0, m, at, h, first);                                                \
            diag_##S(p + diag, g + diag, b ? b + diag : 0, m[at], sign * (T)j->identity, h, first);               \
            span_##S(p + diag + 1, g + diag + 1, b ? b + diag + 1 : 0, m + at + 1, period - at - 1, h, first);     \
        } else {                                                                                                   \
            span_##S(p + s, g + s, b ? b + s : 0, m, period, h, first);                                            \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
/* channels_last: each tap is one run of `channels` elements with a single multiplier */                          \
CLONES static void row_last_##S(const repopt_job *j, int64_t row, const repopt_hyper *h, int64_t diag, T sign) {   \
    int64_t taps = j->taps, channels = j->row_len / taps, off = row * j->row_len;                                  \
    int first = (int)j->first;                                                                                     \
    const T *table = (const T *)j->table + row * taps;                                                             \
    T *p = (T *)j->p + off, *b = j->buf ? (T *)j->buf + off : 0;                                                   \
    const T *g = (const T *)j->g + off;                                                                            \
    for (int64_t t = 0; t < taps; ++t) {                                                                           \
        int64_t s = t * channels;                                                                                  \
        T mt = sign * table[t];                                                                                    \
        if (diag >= s && diag < s + channels) {                                                                    \
            int64_t at = diag - s;                                                                                 \
            fill_##S(p + s, g + s, b ? b + s : 0, mt, at, h, first);                                               \
            diag_##S(p + diag, g + diag, b ? b + diag : 0, mt, sign * (T)j->identity, h, first);                  \
            fill_##S(p + diag + 1, g + diag + 1, b ? b + diag + 1 : 0, mt, channels - at - 1, h, first);          \
        } else {                                                                                                   \
            fill_##S(p + s, g + s, b ? b + s : 0, mt, channels, h, first);                                         \
        }                                                                                                          \
    }                                                                                                              \
}                                                                                                                  \
static void rows_##S(const repopt_job *j, int64_t r0, int64_t r1, const repopt_hyper *h) {                         \
    T sign = h->maximize ? (T)-1 : (T)1;                                                                           \
    int64_t channels = j->row_len / j->taps;                                                                       \
    for (int64_t row = r0; row < r1; ++row) {                                                                      \
        int64_t c = j->diag_group ? row % j->diag_group : -1; /* the identity's input channel in this row */      \
        if (j->channels_last)                                                                                      \
            row_last_##S(j, row, h, c < 0 ? -1 : j->diag_centre * channels + c, sign);                             \
        else                                                                                                       \
            row_##S(j, row, h, c < 0 ? -1 : c * j->taps + j->diag_centre, sign);                                   \
    }                                                                                                              \
}

DEFINE_KERNELS(f32, float, fmaf)
DEFINE_KERNELS(f64, double, fma)

DEFINE_PARALLEL(sgd_parallel, repopt_job, repopt_hyper, rows)

/* Returns -1 (having touched nothing) when a job is malformed (more taps than MAX_PERIOD, a row that is not whole
 * taps); else what sgd_parallel returns. */
int repopt_sgd_step(const repopt_job *jobs, int64_t njobs, const repopt_hyper *h, int is_double, int nthreads) {
    for (int64_t i = 0; i < njobs; ++i) {
        if (jobs[i].taps < 1 || jobs[i].taps > MAX_PERIOD || jobs[i].row_len < 1 || jobs[i].row_len % jobs[i].taps)
            return -1;
    }
    return sgd_parallel(jobs, njobs, h, is_double, nthreads);
}
