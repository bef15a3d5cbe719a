/* cynorm core: the output rows written with streaming (non-temporal) stores.
 *
 * CYNORM_NT_ROW, the loop of every streamed row (plain stores outside the row's whole 64-byte
 * lines), the LN / BN forward rows cynorm_apply_nt_*, cynorm_zero_nt_* (padding rows),
 * cynorm_copy_nt_* (the residual forms' h), and
 * cynorm_sfence.  CYNORM_STREAMING says whether this build streams (x86 with SSE2 and GCC or
 * Clang); without, the same arithmetic with plain stores.  When a row streams is decided in
 * one place: streamed() in core/stores.pxi.
 */
#ifndef CYNORM_CORE_STORES_H
#define CYNORM_CORE_STORES_H

#include "simd.h"

/* Non-temporal stores for outputs far larger than the cache: a normal store first reads the
 * line it writes into (read-for-ownership), so writing y costs a read of y as well; streaming
 * stores skip that read and leave the cache to the data still to come.  cynorm_sfence() orders
 * them before the thread leaves the kernel.  Without x86 intrinsics, plain stores. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \
    && defined(__SSE2__)
#include <immintrin.h>
#include <stdint.h>
#if defined(__AVX512F__)
#define CYNORM_NT_BYTES 64
#define CYNORM_NT_STORE_F(p, v) _mm512_stream_ps((p), (__m512)(v))
#define CYNORM_NT_STORE_D(p, v) _mm512_stream_pd((p), (__m512d)(v))
#elif defined(__AVX__)
#define CYNORM_NT_BYTES 32
#define CYNORM_NT_STORE_F(p, v) _mm256_stream_ps((p), (__m256)(v))
#define CYNORM_NT_STORE_D(p, v) _mm256_stream_pd((p), (__m256d)(v))
#else
#define CYNORM_NT_BYTES 16
#define CYNORM_NT_STORE_F(p, v) _mm_stream_ps((p), (__m128)(v))
#define CYNORM_NT_STORE_D(p, v) _mm_stream_pd((p), (__m128d)(v))
#endif
static inline void cynorm_sfence(void) { _mm_sfence(); }

typedef float cynorm_ntf __attribute__((vector_size(CYNORM_NT_BYTES)));
typedef double cynorm_ntd __attribute__((vector_size(CYNORM_NT_BYTES)));

/* One vector v to p (aligned for it) inside CYNORM_NT_ROW: streamed in its whole-line part, a
 * plain store before and after it */
#define CYNORM_STREAM(VT, NT_STORE, p, v)                                                 \
    do {                                                                                  \
        VT s_ = (v);                                                                      \
        if (nt_)                                                                          \
            NT_STORE((p), s_);                                                            \
        else                                                                              \
            memcpy((p), &s_, sizeof s_);                                                  \
    } while (0)
#define CYNORM_STREAM_F(p, v) CYNORM_STREAM(cynorm_ntf, CYNORM_NT_STORE_F, p, v)
#define CYNORM_STREAM_D(p, v) CYNORM_STREAM(cynorm_ntd, CYNORM_NT_STORE_D, p, v)

/* The loop of every streaming-store row below: one element at a time (ELEM, a statement in j)
 * until y + j is aligned for a vector, then whole vectors (the remaining arguments, statements
 * in j that store through CYNORM_STREAM_F / _D), then the tail one element at a time; a y that
 * never aligns takes no vector.  Only the row's whole 64-byte lines are streamed: the vectors
 * before the first and after the last take plain stores.  A line part streamed and part
 * stored plainly (the rows' ends, with vectors narrower than a line) made BatchNorm's eval 2.4
 * times as slow on a Zen 3 when rows started 40-56 bytes into a line (benchmarks/RESULTS.md,
 * items 66 and 67). */
#define CYNORM_NT_ROW(T, y, n, ELEM, ...)                                                 \
    do {                                                                                  \
        const ptrdiff_t L_ = CYNORM_NT_BYTES / (ptrdiff_t)sizeof(T);                      \
        ptrdiff_t j = 0, e_;                                                              \
        while (j < (n) && j < L_ && ((uintptr_t)((y) + j) % CYNORM_NT_BYTES)) {           \
            ELEM;                                                                         \
            j++;                                                                          \
        }                                                                                 \
        if (((uintptr_t)((y) + j) % CYNORM_NT_BYTES) == 0) {                              \
            {                                                                             \
                const int nt_ = 0;                                                        \
                for (; j + L_ <= (n) && ((uintptr_t)((y) + j) % CYNORM_LINE_BYTES);       \
                     j += L_) {                                                           \
                    __VA_ARGS__;                                                          \
                }                                                                         \
            }                                                                             \
            e_ = j + ((n) - j) / (CYNORM_LINE_BYTES / (ptrdiff_t)sizeof(T))               \
                         * (CYNORM_LINE_BYTES / (ptrdiff_t)sizeof(T));                    \
            {                                                                             \
                const int nt_ = 1;                                                        \
                for (; j < e_; j += L_) {                                                 \
                    __VA_ARGS__;                                                          \
                }                                                                         \
            }                                                                             \
            {                                                                             \
                const int nt_ = 0;                                                        \
                for (; j + L_ <= (n); j += L_) {                                          \
                    __VA_ARGS__;                                                          \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
        for (; j < (n); j++) {                                                            \
            ELEM;                                                                         \
        }                                                                                 \
    } while (0)

/* y = ((x - mh) - ml) * (rs * w) + b, LayerNorm's row (w, b may be NULL), and
 * y = (x - mh) * scale + shift with per-element mh / scale / shift (BatchNorm on (N, C) rows,
 * VEC) or one value each (BatchNorm on rows of L, scalar: ml = 0, w = b = NULL) */
#define CYNORM_APPLY_NT(NAME, T, VT, STREAM)                                              \
static void NAME(const T* x, T* y, ptrdiff_t n, T mh, T ml, T rs, const T* w,             \
                 const T* b) {                                                            \
    VT xv, wv, bv, r;                                                                     \
    CYNORM_NT_ROW(T, y, n,                                                                \
        y[j] = ((x[j] - mh) - ml) * (w ? rs * w[j] : rs) + (b ? b[j] : (T)0),             \
        memcpy(&xv, x + j, sizeof xv);                                                    \
        r = (xv - mh) - ml;                                                               \
        if (w) {                                                                          \
            memcpy(&wv, w + j, sizeof wv);                                                \
            r = r * (rs * wv);                                                            \
        } else {                                                                          \
            r = r * rs;                                                                   \
        }                                                                                 \
        if (b) {                                                                          \
            memcpy(&bv, b + j, sizeof bv);                                                \
            r = r + bv;                                                                   \
        }                                                                                 \
        STREAM(y + j, r));                                                                \
}                                                                                         \
static void NAME##_vec(const T* x, T* y, ptrdiff_t n, const T* mh, const T* sc,           \
                       const T* sh) {                                                     \
    VT xv, mv, sv, hv;                                                                    \
    CYNORM_NT_ROW(T, y, n, y[j] = (x[j] - mh[j]) * sc[j] + sh[j],                         \
        memcpy(&xv, x + j, sizeof xv);                                                    \
        memcpy(&mv, mh + j, sizeof mv);                                                   \
        memcpy(&sv, sc + j, sizeof sv);                                                   \
        memcpy(&hv, sh + j, sizeof hv);                                                   \
        STREAM(y + j, (xv - mv) * sv + hv));                                              \
}                                                                                         \
static void NAME##_scalar(const T* x, T* y, ptrdiff_t n, T mh, T sc, T sh) {              \
    VT xv;                                                                                \
    CYNORM_NT_ROW(T, y, n, y[j] = (x[j] - mh) * sc + sh,                                  \
        memcpy(&xv, x + j, sizeof xv);                                                    \
        STREAM(y + j, (xv - mh) * sc + sh));                                              \
}

/* y[0:n] = 0 with streaming stores (padding rows of a large output) */
#define CYNORM_ZERO_NT(NAME, T, VT, STREAM)                                               \
static void NAME(T* y, ptrdiff_t n) {                                                     \
    VT z = {0};                                                                           \
    CYNORM_NT_ROW(T, y, n, y[j] = 0, STREAM(y + j, z));                                   \
}

/* y[0:n] = x[0:n] with streaming stores (h of the residual-add forms) */
#define CYNORM_COPY_NT(NAME, T, VT, STREAM)                                               \
static void NAME(const T* x, T* y, ptrdiff_t n) {                                         \
    VT xv;                                                                                \
    CYNORM_NT_ROW(T, y, n, y[j] = x[j], memcpy(&xv, x + j, sizeof xv); STREAM(y + j, xv)); \
}

CYNORM_APPLY_NT(cynorm_apply_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_APPLY_NT(cynorm_apply_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)
CYNORM_ZERO_NT(cynorm_zero_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_ZERO_NT(cynorm_zero_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)
CYNORM_COPY_NT(cynorm_copy_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_COPY_NT(cynorm_copy_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)
#define CYNORM_STREAMING 1

#else /* no streaming stores: the same arithmetic, plain stores */

static inline void cynorm_sfence(void) {}

#define CYNORM_APPLY_PLAIN(NAME, T)                                                       \
static void NAME(const T* x, T* y, ptrdiff_t n, T mh, T ml, T rs, const T* w,             \
                 const T* b) {                                                            \
    ptrdiff_t j;                                                                          \
    for (j = 0; j < n; j++)                                                               \
        y[j] = ((x[j] - mh) - ml) * (w ? rs * w[j] : rs) + (b ? b[j] : (T)0);             \
}                                                                                         \
static void NAME##_vec(const T* x, T* y, ptrdiff_t n, const T* mh, const T* sc,          \
                       const T* sh) {                                                     \
    ptrdiff_t j;                                                                          \
    for (j = 0; j < n; j++)                                                               \
        y[j] = (x[j] - mh[j]) * sc[j] + sh[j];                                            \
}                                                                                         \
static void NAME##_scalar(const T* x, T* y, ptrdiff_t n, T mh, T sc, T sh) {            \
    ptrdiff_t j;                                                                          \
    for (j = 0; j < n; j++)                                                               \
        y[j] = (x[j] - mh) * sc + sh;                                                     \
}

static void cynorm_zero_nt_f(float* y, ptrdiff_t n) { memset(y, 0, n * sizeof(float)); }
static void cynorm_zero_nt_d(double* y, ptrdiff_t n) { memset(y, 0, n * sizeof(double)); }
static void cynorm_copy_nt_f(const float* x, float* y, ptrdiff_t n) {
    memcpy(y, x, n * sizeof(float));
}
static void cynorm_copy_nt_d(const double* x, double* y, ptrdiff_t n) {
    memcpy(y, x, n * sizeof(double));
}
CYNORM_APPLY_PLAIN(cynorm_apply_nt_f, float)
CYNORM_APPLY_PLAIN(cynorm_apply_nt_d, double)

#define CYNORM_STREAMING 0
#endif

#endif /* CYNORM_CORE_STORES_H */
