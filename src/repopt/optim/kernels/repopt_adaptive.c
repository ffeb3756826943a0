/* RepOptAdamW's and RepOptLion's native CPU kernels: the exact re-parameterized update of a target conv in one pass
 * over the weight, its gradient and the optimizer's moments (MATH (4) and (5)).
 *
 * A weight is seen as in repopt_sgd.c: rows (output channels) of row_len = C_in/groups * taps elements, ordered
 * (channel, tap) when contiguous and (tap, channel) in channels_last; the identity branch's diagonal element of a row
 * is input channel row % diag_group at tap diag_centre (diag_group 0: no identity).
 *
 * coef holds nb tables of rows x taps. AdamW: table b is |alpha_b| on branch b's support and 0 elsewhere, and
 *     U = sum_b c_b^2 / (c_b s + eps)  (+ 1 / (s + eps) on the identity's diagonal),  s = sqrt(v) / sqrt(1 - beta2^t)
 * (a branch with c_b = 0 adds nothing). Lion: one table, L = sum_b |alpha_b| on each tap (+ 1 on the diagonal).
 *
 * Per element, the operations of RepOptAdamW._step_target / RepOptLion.step (the eager paths), each rounded where
 * torch rounds it, with fma(a, b, c) = a * b + c rounded once exactly where torch's CPU kernels (AVX2 / AVX-512
 * builds) use one (lerp, addcmul, add with alpha):
 *   AdamW: g = maximize ? -g : g;  p *= 1 - lr wd;  m = lerp(m, g, 1 - beta1);  v = fma((1 - beta2) g, g, beta2 v);
 *          amsgrad: vmax = max(vmax, v), s from vmax;  p = fma((-lr / (1 - beta1^t)) m, U, p)
 *          (torch's lerp: fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g))
 *   Lion:  g = maximize ? -g : g;  p *= 1 - lr wd;  c = fma(g, 1 - beta1, beta1 m);  p = fma(L sign(c), -lr, p);
 *          m = fma(g, 1 - beta2, beta2 m)
 * Built with -ffp-contract=off, so nothing else is fused: the result is the same on every CPU. Lion's equals the eager
 * path bit for bit where torch's kernels are AVX2 or AVX-512; AdamW's differs from it only through torch's sqrt,
 * which on CPU is not correctly rounded (off by one unit in the last place for about one float32 in six), while
 * this one is (tests/test_native.py states and checks the bound).
 */
#include <math.h>

#include "common.h"

#define SEG 256        /* elements handled per inner pass (its temporaries live on the stack, in L1) */
#define MAX_BRANCHES 8 /* conv branches per target conv */
#define MAX_TAPS 1024

enum { KIND_ADAMW = 0, KIND_LION = 1 };

typedef struct {
    void *p, *g, *m, *v, *vmax; /* Lion: m only; AdamW: vmax NULL without amsgrad */
    const void *coef;           /* nb x rows x taps */
    int64_t nb, rows, row_len, taps;
    int64_t diag_group, diag_centre;
    int64_t channels_last;
} repopt_ajob;

typedef struct {
    double lr, weight_decay, beta1, beta2, eps;
    double bias_correction1, bias_correction2_sqrt; /* AdamW: 1 - beta1^t, sqrt(1 - beta2^t) */
    int64_t maximize, amsgrad, kind;
} repopt_ahyper;

#define DEFINE_ADAPTIVE(S, T, SQRT, FMA)                                                                                \
/* n <= SEG elements from offset off of the weight; pat[b][k] the coefficients of element k; id: the identity's    \
 * diagonal element (then n == 1) */                                                                               \
INLINE void adamw_##S(const repopt_ajob *j, int64_t off, const T *const *pat, int64_t n, int id,                   \
                      const repopt_ahyper *h) {                                                                    \
    T *restrict p = (T *)j->p + off, *restrict m = (T *)j->m + off, *restrict v = (T *)j->v + off;                 \
    T *restrict vmax = j->vmax ? (T *)j->vmax + off : 0;                                                           \
    const T *restrict g = (const T *)j->g + off;                                                                   \
    T s[SEG], u[SEG];                                                                                              \
    const T sign = h->maximize ? (T)-1 : (T)1, decay = (T)(1.0 - h->lr * h->weight_decay);                        \
    const T w = (T)(1.0 - h->beta1), beta2 = (T)h->beta2, keep2 = (T)(1.0 - h->beta2), eps = (T)h->eps;            \
    const T bc2 = (T)h->bias_correction2_sqrt, step = (T)(-h->lr / h->bias_correction1);                          \
    for (int64_t k = 0; k < n; ++k) {                                                                              \
        T gk = sign * g[k];                                                                                        \
        /* torch's lerp: start + w (end - start) for w < 0.5, end - (end - start)(1 - w) otherwise */              \
        m[k] = w < (T)0.5 ? FMA(w, gk - m[k], m[k]) : FMA(w - (T)1, gk - m[k], gk);                               \
        v[k] = FMA(keep2 * gk, gk, v[k] * beta2);                                                                  \
    }                                                                                                              \
    if (vmax) {                                                                                                    \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            vmax[k] = vmax[k] > v[k] || vmax[k] != vmax[k] ? vmax[k] : v[k];                                       \
            s[k] = SQRT(vmax[k]) / bc2;                                                                            \
        }                                                                                                          \
    } else {                                                                                                       \
        for (int64_t k = 0; k < n; ++k) s[k] = SQRT(v[k]) / bc2;                                                   \
    }                                                                                                              \
    for (int64_t k = 0; k < n; ++k) u[k] = 0;                                                                      \
    for (int64_t b = 0; b < j->nb; ++b) {                                                                          \
        const T *restrict c = pat[b];                                                                              \
        for (int64_t k = 0; k < n; ++k) { /* c = 0 (off the support) adds 0 / 1: exactly nothing */              \
            T den = c[k] * s[k] + eps;                                                                             \
            u[k] += (c[k] * c[k]) / (c[k] != 0 ? den : (T)1);                                                      \
        }                                                                                                          \
    }                                                                                                              \
    if (id) u[0] += (T)1 / (s[0] + eps);                                                                           \
    for (int64_t k = 0; k < n; ++k) p[k] = FMA(step * m[k], u[k], p[k] * decay);                                   \
}                                                                                                                  \
INLINE void lion_##S(const repopt_ajob *j, int64_t off, const T *const *pat, int64_t n, int id,                    \
                     const repopt_ahyper *h) {                                                                     \
    T *restrict p = (T *)j->p + off, *restrict m = (T *)j->m + off;                                                \
    const T *restrict g = (const T *)j->g + off, *restrict l = pat[0];                                             \
    const T sign = h->maximize ? (T)-1 : (T)1, decay = (T)(1.0 - h->lr * h->weight_decay), lr = (T)h->lr;          \
    const T beta1 = (T)h->beta1, keep1 = (T)(1.0 - h->beta1), beta2 = (T)h->beta2, keep2 = (T)(1.0 - h->beta2);   \
    const T extra = id ? (T)1 : (T)0;                                                                              \
    for (int64_t k = 0; k < n; ++k) {                                                                              \
        T gk = sign * g[k], c = FMA(gk, keep1, m[k] * beta1);                                                      \
        T sg = c > 0 ? (T)1 : (c < 0 ? (T)-1 : c); /* torch.sign: 0 stays 0, NaN stays NaN */                    \
        p[k] = FMA((l[k] + extra) * sg, -lr, p[k] * decay);                                                        \
        m[k] = FMA(gk, keep2, m[k] * beta2);                                                                       \
    }                                                                                                              \
}                                                                                                                  \
/* elements [off, off + n) of the weight with coefficients pat (valid for n elements), cut around the diagonal */  \
INLINE void span_##S(const repopt_ajob *j, int64_t off, const T *const *pat, int64_t n, int64_t diag,              \
                     const repopt_ahyper *h) {                                                                     \
    const T *moved[MAX_BRANCHES];                                                                                  \
    int64_t nb = j->nb, cut[3][2] = {{off, n}, {0, 0}, {0, 0}}, pieces = 1;                                        \
    if (diag >= off && diag < off + n) {                                                                           \
        cut[0][1] = diag - off; cut[1][0] = diag; cut[1][1] = 1;                                                   \
        cut[2][0] = diag + 1; cut[2][1] = off + n - diag - 1; pieces = 3;                                          \
    }                                                                                                              \
    for (int64_t q = 0; q < pieces; ++q) {                                                                         \
        if (cut[q][1] == 0) continue;                                                                              \
        for (int64_t b = 0; b < nb; ++b) moved[b] = pat[b] + (cut[q][0] - off);                                    \
        if (h->kind == KIND_ADAMW) adamw_##S(j, cut[q][0], moved, cut[q][1], q == 1, h);                           \
        else lion_##S(j, cut[q][0], moved, cut[q][1], q == 1, h);                                                  \
    }                                                                                                              \
}                                                                                                                  \
CLONES static void rows_##S(const repopt_ajob *j, int64_t r0, int64_t r1, const repopt_ahyper *h) {                \
    T buf[MAX_BRANCHES][SEG];                                                                                      \
    const T *pat[MAX_BRANCHES];                                                                                    \
    int64_t taps = j->taps, channels = j->row_len / taps, nb = j->nb;                                              \
    for (int64_t row = r0; row < r1; ++row) {                                                                      \
        int64_t base = row * j->row_len, diag = -1;                                                                \
        if (j->diag_group) {                                                                                       \
            int64_t c = row % j->diag_group;                                                                       \
            diag = base + (j->channels_last ? j->diag_centre * channels + c : c * taps + j->diag_centre);          \
        }                                                                                                          \
        const T *coef = (const T *)j->coef + row * taps; /* table b of this row: coef + b * rows * taps */         \
        if (j->channels_last) { /* each tap: a run of `channels` elements with constant coefficients */            \
            int64_t fill = channels < SEG ? channels : SEG;                                                        \
            for (int64_t t = 0; t < taps; ++t) {                                                                   \
                for (int64_t b = 0; b < nb; ++b) {                                                                 \
                    T value = coef[b * j->rows * taps + t];                                                        \
                    for (int64_t k = 0; k < fill; ++k) buf[b][k] = value;                                          \
                    pat[b] = buf[b];                                                                               \
                }                                                                                                  \
                for (int64_t s = 0; s < channels; s += SEG)                                                        \
                    span_##S(j, base + t * channels + s, pat, channels - s < SEG ? channels - s : SEG, diag, h);   \
            }                                                                                                      \
        } else if (taps <= SEG) { /* the row's taps repeated over r channels: one pattern per SEG-sized period */  \
            int64_t r = SEG / taps;                                                                                \
            if (r > channels) r = channels;                                                                        \
            while (channels % r) --r;                                                                              \
            int64_t period = r * taps;                                                                             \
            for (int64_t b = 0; b < nb; ++b) {                                                                     \
                memcpy(buf[b], coef + b * j->rows * taps, (size_t)taps * sizeof(T));                               \
                for (int64_t k = taps; k < period; k *= 2)                                                         \
                    memcpy(buf[b] + k, buf[b], (size_t)(2 * k <= period ? k : period - k) * sizeof(T));            \
                pat[b] = buf[b];                                                                                   \
            }                                                                                                      \
            for (int64_t s = 0; s < j->row_len; s += period) span_##S(j, base + s, pat, period, diag, h);          \
        } else { /* long kernels: each channel's taps straight from the table, SEG at a time */                    \
            for (int64_t c = 0; c < channels; ++c) {                                                               \
                for (int64_t s = 0; s < taps; s += SEG) {                                                          \
                    for (int64_t b = 0; b < nb; ++b) pat[b] = coef + b * j->rows * taps + s;                       \
                    span_##S(j, base + c * taps + s, pat, taps - s < SEG ? taps - s : SEG, diag, h);               \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
}

DEFINE_ADAPTIVE(f32, float, sqrtf, fmaf)
DEFINE_ADAPTIVE(f64, double, sqrt, fma)

DEFINE_PARALLEL(adaptive_parallel, repopt_ajob, repopt_ahyper, rows)

/* Returns -1 (having touched nothing) when a job is malformed; else what adaptive_parallel returns. */
int repopt_adaptive_step(const repopt_ajob *jobs, int64_t njobs, const repopt_ahyper *h, int is_double,
                         int nthreads) {
    if (h->kind != KIND_ADAMW && h->kind != KIND_LION) return -1;
    for (int64_t i = 0; i < njobs; ++i) {
        const repopt_ajob *j = &jobs[i];
        if (j->taps < 1 || j->taps > MAX_TAPS || j->row_len < 1 || j->row_len % j->taps || j->nb < 1
            || j->nb > MAX_BRANCHES || (h->kind == KIND_LION && j->nb != 1) || (h->kind == KIND_ADAMW && !j->v))
            return -1;
    }
    return adaptive_parallel(jobs, njobs, h, is_double, nthreads);
}
