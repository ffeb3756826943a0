/* What the RepOpt kernels share: instruction-set clones, and splitting the rows of many weights over threads. */
#ifndef REPOPT_COMMON_H
#define REPOPT_COMMON_H

#include <pthread.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* One copy of the row loops per instruction set, picked when the library loads: AVX-512 where the CPU has it (torch's
 * own CPU kernels use it there, and a core's step is bound by the instructions it issues as much as by memory:
 * with AVX2 alone it was slower than torch's fused SGD, docs/benchmarks.md), else AVX2+FMA (the updates are
 * compute-bound on SSE2's 4-wide vectors), else the baseline. All compute the same bits: the library is built with
 * -ffp-contract=off and calls fma() explicitly, and every operation is correctly rounded at any vector width.
 * -DREPOPT_NO_CLONES builds the baseline alone, -DREPOPT_NO_AVX512 leaves the AVX-512 clone out: tests/test_native.py
 * compares them. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && !defined(REPOPT_NO_CLONES)
#ifdef REPOPT_NO_AVX512
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

/* DEFINE_PARALLEL(NAME, JOB, HYPER, ROWS) defines
 *     int NAME(const JOB *jobs, int64_t njobs, const HYPER *h, int is_double, int nthreads)
 * which runs ROWS##_f32 or ROWS##_f64 (job, first row, end row, h) over all rows of all jobs (a JOB has `rows` and
 * `row_len`), split evenly by elements over `nthreads` threads: a thread takes the rows whose first element lies in
 * its range. Built with -fopenmp the threads are OpenMP's: the libgomp torch has already loaded (same soname), i.e.
 * torch's own warm pool, so nothing is started and nothing competes with torch's spinning workers; otherwise POSIX
 * threads are started per call. Returns 0, or the number of threads that could not be started (their rows were
 * done by the calling thread). */
#define DEFINE_PARALLEL(NAME, JOB, HYPER, ROWS)                                                                    \
typedef struct { const JOB *jobs; int64_t njobs; const HYPER *h; int64_t lo, hi; int is_double; } NAME##_slice;    \
static void *NAME##_run(void *arg) {                                                                               \
    const NAME##_slice *s = (const NAME##_slice *)arg;                                                             \
    int64_t base = 0;                                                                                              \
    for (int64_t i = 0; i < s->njobs; ++i) {                                                                       \
        const JOB *j = &s->jobs[i];                                                                                \
        int64_t size = j->rows * j->row_len;                                                                       \
        if (base + size > s->lo && base < s->hi) {                                                                 \
            int64_t r0 = s->lo <= base ? 0 : (s->lo - base + j->row_len - 1) / j->row_len;                         \
            int64_t r1 = (s->hi - base + j->row_len - 1) / j->row_len;                                             \
            if (r1 > j->rows) r1 = j->rows;                                                                        \
            if (r0 < r1) {                                                                                         \
                if (s->is_double) ROWS##_f64(j, r0, r1, s->h);                                                     \
                else ROWS##_f32(j, r0, r1, s->h);                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        base += size;                                                                                              \
    }                                                                                                              \
    return 0;                                                                                                      \
}                                                                                                                  \
static int NAME(const JOB *jobs, int64_t njobs, const HYPER *h, int is_double, int nthreads) {                     \
    int64_t total = 0;                                                                                             \
    for (int64_t i = 0; i < njobs; ++i) total += jobs[i].rows * jobs[i].row_len;                                   \
    if (nthreads < 1) nthreads = 1;                                                                                \
    if (nthreads > 64) nthreads = 64;                                                                              \
    REPOPT_PARALLEL_BODY(NAME)                                                                                     \
}

#ifdef _OPENMP
#define REPOPT_PARALLEL_BODY(NAME)                                                                                 \
    _Pragma("omp parallel num_threads(nthreads)")                                                                  \
    {                                                                                                              \
        int t = omp_get_thread_num(), n = omp_get_num_threads();                                                   \
        NAME##_slice slice = {jobs, njobs, h, total * t / n, total * (t + 1) / n, is_double};                      \
        NAME##_run(&slice);                                                                                        \
    }                                                                                                              \
    return 0;
#else
#define REPOPT_PARALLEL_BODY(NAME)                                                                                 \
    NAME##_slice slices[64];                                                                                       \
    pthread_t threads[64];                                                                                         \
    int started[64] = {0}, failed = 0;                                                                             \
    for (int t = 0; t < nthreads; ++t)                                                                             \
        slices[t] = (NAME##_slice){jobs, njobs, h, total * t / nthreads, total * (t + 1) / nthreads, is_double};   \
    for (int t = 1; t < nthreads; ++t)                                                                             \
        started[t] = pthread_create(&threads[t], 0, NAME##_run, &slices[t]) == 0;                                  \
    NAME##_run(&slices[0]);                                                                                        \
    for (int t = 1; t < nthreads; ++t) {                                                                           \
        if (started[t]) pthread_join(threads[t], 0);                                                               \
        else { NAME##_run(&slices[t]); ++failed; }                                                                 \
    }                                                                                                              \
    return failed;
#endif

#endif
