/* cynorm core: vector types and primitives shared by every kernel.
 *
 * - cynorm_v8d / cynorm_v8f (eight doubles / floats, GCC and Clang vector extensions), the
 *   widening of eight floats to eight doubles and the horizontal sum, and which build this is
 *   (CYNORM_AVX2_BUILD, CYNORM_SSE2_BUILD: the code paths that differ by vector width);
 * - cynorm_split_f: the two-term mean hi + lo as two floats;
 * - CYNORM_RESTRICT, cynorm_prefetch, CYNORM_PUT8F (eight floats, streamed or not),
 *   cynorm_nt_head (where a row reaches a 32-byte boundary);
 * - masked loads and stores of the first n (1 to 8) elements, and cynorm_acc8 (p += s in
 *   float64).
 */
#ifndef CYNORM_CORE_SIMD_H
#define CYNORM_CORE_SIMD_H

#include <stddef.h>
#include <string.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)

typedef double cynorm_v8d __attribute__((vector_size(64)));
typedef float cynorm_v8f __attribute__((vector_size(32)));

/* eight floats to eight doubles: one vcvtps2pd ymm -> zmm with AVX-512 (GCC 12 splits
   __builtin_convertvector into two halves and a vinsertf64x4 there) */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline cynorm_v8d cynorm_widen(cynorm_v8f v) {
    return (cynorm_v8d)_mm512_cvtps_pd((__m256)v);
}
#else
static inline cynorm_v8d cynorm_widen(cynorm_v8f v) {
    return __builtin_convertvector(v, cynorm_v8d);
}
#endif

static inline double cynorm_hsum(cynorm_v8d v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* CYNORM_AVX2_BUILD: AVX without AVX-512.  Eight doubles (64 bytes) have no machine mode
   there, so GCC keeps cynorm_v8d values in memory and assembles them element by element (3x
   slower than the baseline build in the two-sum loops on a Zen 3).  Its hot loops hold the
   same eight lanes as two halves of four doubles instead, with these helpers. */
#if defined(__AVX__) && !defined(__AVX512F__)
#define CYNORM_AVX2_BUILD 1
#include <immintrin.h>
typedef double cynorm_v4d __attribute__((vector_size(32)));

/* lanes 0-3 and 4-7 of eight floats as doubles, one vcvtps2pd each */
static inline cynorm_v4d cynorm_widen_lo(cynorm_v8f v) {
    return (cynorm_v4d)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
}
static inline cynorm_v4d cynorm_widen_hi(cynorm_v8f v) {
    return (cynorm_v4d)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
}
/* cynorm_hsum of the eight lanes lo (0-3), hi (4-7): the same additions in the same order */
static inline double cynorm_hsum_halves(cynorm_v4d lo, cynorm_v4d hi) {
    cynorm_v4d u = lo + hi;
    return (u[0] + u[2]) + (u[1] + u[3]);
}
#else
#define CYNORM_AVX2_BUILD 0
#endif

/* CYNORM_SSE2_BUILD: x86 without AVX (the baseline kernels of an x86-64 wheel).  Eight floats
   are two 16-byte registers there, and GCC turns a float scalar used with them into a vector
   through the stack (eight 4-byte stores, two 16-byte loads that wait for them).  LN
   backward's four-row sweep, with five such scalars per row, works in four floats instead. */
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__) && !defined(__AVX__)
#define CYNORM_SSE2_BUILD 1
#include <emmintrin.h>
typedef float cynorm_v4f __attribute__((vector_size(16)));
#else
#define CYNORM_SSE2_BUILD 0
#endif

#endif

/* hi + lo as two floats: mh = hi + lo rounded, ml = what that rounding left out, rounded.
 * mh goes through a volatile: ml needs (double)mh to be the float's value.  Where GCC 12
 * vectorized four of these side by side (a loop over four rows' means), it folded the vector
 * narrowing-then-widening away: (double)mh became hi + lo itself and ml became 0 (seen in its
 * -fdump-tree-optimized output, and as errors of 1e-4 in LayerNorm backward's dx on rows with
 * mean 1e4).  The volatile keeps the conversions apart from any vectorized neighbours. */
static inline void cynorm_split_f(double hi, double lo, float* mh, float* ml) {
    volatile float h = (float)(hi + lo);
    float v = h;
    *mh = v;
    *ml = (float)((hi - (double)v) + lo);
}

/* cynorm_split_f(m[k], 0.0, mh + k, ml + k) for k < n, four at a time in the AVX builds: the
 * same operations (the + 0.0 included, which turns -0.0 into 0.0), the conversions written as
 * intrinsics, which the fold cynorm_split_f's volatile guards against does not see through. */
static inline void cynorm_split_many(const double* m, float* mh, float* ml, ptrdiff_t n) {
    ptrdiff_t k = 0;
#if defined(__AVX__)
    const __m256d z = _mm256_setzero_pd();
    for (; k + 4 <= n; k += 4) {
        const __m256d v = _mm256_loadu_pd(m + k);
        const __m128 h = _mm256_cvtpd_ps(_mm256_add_pd(v, z));
        _mm_storeu_ps(mh + k, h);
        const __m256d r = _mm256_sub_pd(v, _mm256_cvtps_pd(h));
        _mm_storeu_ps(ml + k, _mm256_cvtpd_ps(_mm256_add_pd(r, z)));
    }
#endif
    for (; k < n; k++)
        cynorm_split_f(m[k], 0.0, mh + k, ml + k);
}

#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define CYNORM_RESTRICT __restrict
#else
#define CYNORM_RESTRICT
#endif

/* A hint to load the cache line holding p (never faults, whatever p is). */
#define CYNORM_LINE_BYTES 64
#if defined(__GNUC__) || defined(__clang__)
#define cynorm_prefetch(p) __builtin_prefetch(p)
#else
#define cynorm_prefetch(p) ((void)(p))
#endif

/* Eight floats v to p: a streaming store when nt (p then 32-byte aligned, see cynorm_nt_head),
   a plain one otherwise (the backward sweeps' dx, from the same size as the forward outputs) */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX__)
#include <immintrin.h>
#define CYNORM_CAN_STREAM8 1
#define CYNORM_PUT8F(p, v, nt)                                                            \
    do { if (nt) _mm256_stream_ps((p), (__m256)(v)); else memcpy((p), &(v), 32); } while (0)
#else
#define CYNORM_CAN_STREAM8 0
#define CYNORM_PUT8F(p, v, nt) memcpy((p), &(v), 32)
#endif

/* How many elements of float rows ld apart come before each row is 32-byte aligned (at most
   n), or -1: no streaming stores for them (rows aligned differently, or none here) */
static inline ptrdiff_t cynorm_nt_head(const float* p, ptrdiff_t ld, ptrdiff_t n) {
    uintptr_t a = (uintptr_t)p % 32;
    ptrdiff_t h;
    if (!CYNORM_CAN_STREAM8 || a % sizeof(float) || (ld * (ptrdiff_t)sizeof(float)) % 32)
        return -1;
    h = (ptrdiff_t)((32 - a) % 32 / sizeof(float));
    return h < n ? h : n;
}

#if defined(__GNUC__) || defined(__clang__)
/* The first n (1 to 8) floats or doubles at p as eight, the rest zero, and back: masked loads
   and stores where the ISA has them (never touching memory past n), a copy otherwise */
static inline cynorm_v8f cynorm_ldf(const float* p, ptrdiff_t n) {
    cynorm_v8f v = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n == 8) {
        memcpy(&v, p, 32);
        return v;
    }
#if defined(__AVX512VL__)
    return (cynorm_v8f)_mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1), p);
#elif defined(__AVX2__)
    return (cynorm_v8f)_mm256_maskload_ps(
        p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
#else
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
#endif
}

static inline cynorm_v8d cynorm_ldd(const double* p, ptrdiff_t n) {
    cynorm_v8d v = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n == 8) {
        memcpy(&v, p, 64);
        return v;
    }
#if defined(__AVX512F__)
    return (cynorm_v8d)_mm512_maskz_loadu_pd((__mmask8)((1u << n) - 1), p);
#else
    memcpy(&v, p, (size_t)n * sizeof(double));
    return v;
#endif
}

static inline void cynorm_stf(float* p, cynorm_v8f v, ptrdiff_t n, int nt) {
    if (n == 8) {
        CYNORM_PUT8F(p, v, nt);
        return;
    }
#if defined(__AVX512VL__)
    _mm256_mask_storeu_ps(p, (__mmask8)((1u << n) - 1), (__m256)v);
#elif defined(__AVX2__)
    _mm256_maskstore_ps(
        p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
        (__m256)v);
#else
    memcpy(p, &v, (size_t)n * sizeof(float));
#endif
}

static inline void cynorm_std(double* p, cynorm_v8d v, ptrdiff_t n) {
    if (n == 8) {
        memcpy(p, &v, 64);
        return;
    }
#if defined(__AVX512F__)
    _mm512_mask_storeu_pd(p, (__mmask8)((1u << n) - 1), (__m512d)v);
#else
    memcpy(p, &v, (size_t)n * sizeof(double));
#endif
}

/* p[0:n] += s[0:n] in float64, n from 1 to 8 (the parameter gradients' and BatchNorm's column
   sums).  AVX2 builds add in two halves of four doubles. */
static inline void cynorm_acc8(double* p, cynorm_v8f s, ptrdiff_t n) {
#if CYNORM_AVX2_BUILD
    if (n == 8) {
        cynorm_v4d lo, hi;
        memcpy(&lo, p, 32);
        memcpy(&hi, p + 4, 32);
        lo += cynorm_widen_lo(s);
        hi += cynorm_widen_hi(s);
        memcpy(p, &lo, 32);
        memcpy(p + 4, &hi, 32);
    } else {
        float t[8];
        ptrdiff_t i;
        memcpy(t, &s, 32);
        for (i = 0; i < n; i++)
            p[i] += (double)t[i];
    }
#else
    cynorm_std(p, cynorm_ldd(p, n) + cynorm_widen(s), n);
#endif
}

#endif

#endif /* CYNORM_CORE_SIMD_H */
