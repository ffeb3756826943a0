/* RepOptSGD's native CPU kernel: M * G and torch's SGD update in one pass over p, G and the momentum buffer.
 *
 * Built on first use by repopt/optim/native.py with the machine's C compiler (plain C, no torch headers, so it
 * compiles in about a second) and called through ctypes, which releases the GIL. Python passes one job per target
 * weight; the rows of all jobs are split evenly (by elements) over `nthreads` threads: OpenMP's when built with
 * -fopenmp (then torch's own pool, see repopt_sgd_step), POSIX threads started per call otherwise.
 *
 * A weight (C_out, C_in/groups, kh, kw) is seen as C_out rows of row_len = C_in/groups * taps elements (taps = kh*kw).
 * The multiplier of an element is table[row * taps + tap] (the tap table: the sum of alpha^2 over the branches that
 * cover the tap), plus `identity` on the identity branch's diagonal centre tap: input channel row % diag_group at tap
 * diag_centre (diag_group 0: no identity branch). Within a row the elements are ordered (channel, tap) in the
 * contiguous layout and (tap, channel) in channels_last.
 *
 * Per element, in torch.optim.SGD's order (aten's fused CPU SGD kernel does the same arithmetic):
 *     d = m * g;  d = maximize ? -d : d;  d += weight_decay * p
 *     momentum: b = first ? d : momentum * b + (1 - dampening) * d;  d = nesterov ? d + momentum * b : b
 *     p -= lr * d
 * float32 weights are computed in float32, float64 weights in float64.
 */
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

/* One copy of the row loops per instruction set, picked when the library loads: AVX2+FMA where the CPU has it (the
 * update is compute-bound on SSE2's 4-wide vectors), the baseline elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

#define MAX_PERIOD 1024 /* the longest repeated multiplier a row builds on the stack (and the most taps a kernel has) */

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

typedef struct {
    const repopt_job *jobs;
    int64_t njobs;
    const repopt_hyper *h;
    int64_t lo, hi;        /* this thread's rows: those whose first element index lies in [lo, hi) */
    int is_double;
} repopt_slice;

/* The update of n elements; M is the multiplier of element k (an array read or one value). The flags are loop
 * invariants: each case is its own loop so that every loop vectorises. */
#define UPDATE_LOOPS(T, M)                                                                                         \
    const T lr = (T)h->lr, wd = (T)h->weight_decay, mom = (T)h->momentum, keep = (T)(1.0 - h->dampening);        \
    if (b == 0) {                                                                                                  \
        for (int64_t k = 0; k < n; ++k) p[k] = p[k] - lr * ((M) * g[k] + wd * p[k]);                               \
    } else if (first) {                                                                                            \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (M) * g[k] + wd * p[k];                                                                          \
            b[k] = d;                                                                                              \
            p[k] = p[k] - lr * (h->nesterov ? d + mom * d : d);                                                    \
        }                                                                                                          \
    } else if (h->nesterov) {                                                                                      \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T d = (M) * g[k] + wd * p[k];                                                                          \
            T nb = mom * b[k] + keep * d;                                                                          \
            b[k] = nb;                                                                                             \
            p[k] = p[k] - lr * (d + mom * nb);                                                                     \
        }                                                                                                          \
    } else {                                                                                                       \
        for (int64_t k = 0; k < n; ++k) {                                                                          \
            T nb = mom * b[k] + keep * ((M) * g[k] + wd * p[k]);                                                   \
            b[k] = nb;                                                                                             \
            p[k] = p[k] - lr * nb;                                                                                 \
        }                                                                                                          \
    }

#define DEFINE_KERNELS(S, T)                                                                                       \
INLINE void span_##S(T *restrict p, const T *restrict g, T *restrict b, const T *restrict m, int64_t n,            \
                     const repopt_hyper *h, int first) {                                                           \
    UPDATE_LOOPS(T, m[k])                                                                                          \
}                                                                                                                  \
INLINE void fill_##S(T *restrict p, const T *restrict g, T *restrict b, T m, int64_t n, const repopt_hyper *h,    \
                     int first) {                                                                                  \
    UPDATE_LOOPS(T, m)                                                                                             \
}                                                                                                                  \
/* contiguous layout: the row's taps repeat every `taps` elements; they are repeated R times on the stack so that   \
 * the inner loop is long, and the period that holds the diagonal is cut around it */                             \
CLONES static void row_##S(const repopt_job *j, int64_t row, const repopt_hyper *h, int64_t diag, T sign) {        \
    T m[MAX_PERIOD];                                                                                               \
    int64_t taps = j->taps, channels = j->row_len / taps, r = MAX_PERIOD / taps, off = row * j->row_len;           \
    int first = (int)j->first;                                                                                     \
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
            fill_##S(p + diag, g + diag, b ? b + diag : 0, m[at] + sign * (T)j->identity, 1, h, first);           \
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
            fill_##S(p + diag, g + diag, b ? b + diag : 0, mt + sign * (T)j->identity, 1, h, first);              \
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

DEFINE_KERNELS(f32, float)
DEFINE_KERNELS(f64, double)

static void *run_slice(void *arg) {
    const repopt_slice *s = (const repopt_slice *)arg;
    int64_t base = 0;
    for (int64_t i = 0; i < s->njobs; ++i) {
        const repopt_job *j = &s->jobs[i];
        int64_t size = j->rows * j->row_len;
        if (base + size > s->lo && base < s->hi) { /* rows r with base + r * row_len in [lo, hi) */
            int64_t r0 = s->lo <= base ? 0 : (s->lo - base + j->row_len - 1) / j->row_len;
            int64_t r1 = (s->hi - base + j->row_len - 1) / j->row_len;
            if (r1 > j->rows) r1 = j->rows;
            if (r0 < r1) {
                if (s->is_double) rows_f64(j, r0, r1, s->h);
                else rows_f32(j, r0, r1, s->h);
            }
        }
        base += size;
    }
    return 0;
}

/* Returns -1 (having touched nothing) when a job is malformed (more taps than MAX_PERIOD, a row that is not whole
 * taps); else 0, or the number of threads that could not be started (their rows were done by the calling thread). */
int repopt_sgd_step(const repopt_job *jobs, int64_t njobs, const repopt_hyper *h, int is_double, int nthreads) {
    int64_t total = 0;
    for (int64_t i = 0; i < njobs; ++i) {
        if (jobs[i].taps < 1 || jobs[i].taps > MAX_PERIOD || jobs[i].row_len < 1 || jobs[i].row_len % jobs[i].taps)
            return -1;
        total += jobs[i].rows * jobs[i].row_len;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
#ifdef _OPENMP
    /* built with -fopenmp: the libgomp that torch has already loaded (same soname), i.e. torch's own warm thread pool,
     * so the kernel neither starts threads nor competes with torch's spinning workers */
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        repopt_slice slice = {jobs, njobs, h, total * t / n, total * (t + 1) / n, is_double};
        run_slice(&slice);
    }
    return failed;
#else
    repopt_slice slices[64];
    pthread_t threads[64];
    int started[64] = {0}, failed = 0;
    for (int t = 0; t < nthreads; ++t)
        slices[t] = (repopt_slice){jobs, njobs, h, total * t / nthreads, total * (t + 1) / nthreads, is_double};
    for (int t = 1; t < nthreads; ++t)
        started[t] = pthread_create(&threads[t], 0, run_slice, &slices[t]) == 0;
    run_slice(&slices[0]);
    for (int t = 1; t < nthreads; ++t) {
        if (started[t]) pthread_join(threads[t], 0);
        else { run_slice(&slices[t]); ++failed; }
    }
    return failed;
#endif
}
