/* cynorm: the two-sum reductions GCC will not vectorize well from plain loops.
 *
 * Shifted sums of a contiguous block, in float64:
 *   cynorm_shifted_sums:  s1 = sum(x - shift),  s2 = sum((x - shift)^2)      (moments)
 *   cynorm_gx_sums:       s1 = sum(g),          s2 = sum(g * (x - shift))    (backward)
 * where g is grad_out times w when w is not NULL.
 * Written as plain loops over partial sums, GCC vectorizes the float32 versions by SLP but turns
 * the float64 ones into permute-heavy interleaved loads (3-4x slower).  GCC and Clang get
 * explicit 8 x float64 vectors here (two of them, for latency); every other compiler gets four
 * scalar partial sums.  No reassociation beyond the partial sums: NaN and inf propagate.
 */
#ifndef CYNORM_SIMD_H
#define CYNORM_SIMD_H

#include <stddef.h>
#include <string.h>
#include <stdint.h>

#define CYNORM_D(d, g) (d)
#define CYNORM_DD(d, g) ((d) * (d))
#define CYNORM_G(d, g) (g)
#define CYNORM_GD(d, g) ((g) * (d))

/* moments:  cynorm_shifted_sums_{f,d}(NULL, NULL, x, n, shift, &sum(d), &sum(d*d))
   backward: cynorm_gx_sums_{f,d}(g, w, x, n, shift, &sum(gw), &sum(gw*d))   with d = x - shift,
             gw = g * w (w may be NULL: gw = g) */
#define CYNORM_INSTANTIATE(LOAD_F, LOAD_D)                                                \
    CYNORM_TWO_SUMS(cynorm_shifted_sums_f, float, LOAD_F, CYNORM_D, CYNORM_DD)            \
    CYNORM_TWO_SUMS(cynorm_shifted_sums_d, double, LOAD_D, CYNORM_D, CYNORM_DD)           \
    CYNORM_TWO_SUMS(cynorm_gx_sums_f, float, LOAD_F, CYNORM_G, CYNORM_GD)                 \
    CYNORM_TWO_SUMS(cynorm_gx_sums_d, double, LOAD_D, CYNORM_G, CYNORM_GD)

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

/* s1 += A, s2 += B over x[0:n] (and g[0:n]), where d = x - shift; A and B are expressions in
   d and g: (d, d * d) for the moments, (g, g * d) for the backward sums. */

/* The elements after the last whole sixteen, one at a time in float64, then the results. */
#define CYNORM_TWO_SUMS_TAIL(A, B)                                                        \
    for (; i < n; i++) {                                                                  \
        ds = (double)x[i] - shift;                                                        \
        if (g_)                                                                           \
            gs = (double)g_[i] * (w_ ? (double)w_[i] : 1.0);                              \
        t1 += A(ds, gs);                                                                  \
        t2 += B(ds, gs);                                                                  \
    }                                                                                     \
    *s1 = t1;                                                                             \
    *s2 = t2;
#define CYNORM_TWO_SUMS(NAME, T, LOAD8, A, B)                                             \
static void NAME(const T* g_, const T* w_, const T* x, ptrdiff_t n, double shift,        \
                 double* s1, double* s2) {                                                \
    cynorm_v8d zero = {0, 0, 0, 0, 0, 0, 0, 0};                                           \
    cynorm_v8d k = zero + shift, a0 = zero, a1 = zero, q0 = zero, q1 = zero;              \
    cynorm_v8d d, e, g = zero, h = zero, u, v;                                            \
    ptrdiff_t i = 0;                                                                      \
    double t1, t2, ds, gs = 0;                                                            \
    for (; i + 16 <= n; i += 16) {                                                        \
        LOAD8(d, x + i);                                                                  \
        LOAD8(e, x + i + 8);                                                              \
        if (g_) {                                                                         \
            LOAD8(g, g_ + i);                                                             \
            LOAD8(h, g_ + i + 8);                                                         \
            if (w_) {                                                                     \
                LOAD8(u, w_ + i);                                                         \
                LOAD8(v, w_ + i + 8);                                                     \
                g *= u;                                                                   \
                h *= v;                                                                   \
            }                                                                             \
        }                                                                                 \
        d -= k;                                                                           \
        e -= k;                                                                           \
        a0 += A(d, g);                                                                    \
        a1 += A(e, h);                                                                    \
        q0 += B(d, g);                                                                    \
        q1 += B(e, h);                                                                    \
    }                                                                                     \
    t1 = cynorm_hsum(a0 + a1);                                                            \
    t2 = cynorm_hsum(q0 + q1);                                                            \
    CYNORM_TWO_SUMS_TAIL(A, B)                                                            \
}

#define CYNORM_LOAD8_D(v, p) memcpy(&(v), (p), sizeof(cynorm_v8d))
#define CYNORM_LOAD8_F(v, p)                                                              \
    do {                                                                                  \
        cynorm_v8f f_;                                                                    \
        memcpy(&f_, (p), sizeof(cynorm_v8f));                                             \
        (v) = cynorm_widen(f_);                                                           \
    } while (0)

#if CYNORM_AVX2_BUILD
/* AVX2 builds: the same sixteen partial sums in the same order, held as four vectors of four
   doubles (a[0], a[1]: lanes 0-3, 4-7 of the first eight; a[2], a[3]: of the next eight). */

#undef CYNORM_TWO_SUMS
#define CYNORM_TWO_SUMS(NAME, T, LOAD4, A, B)                                             \
static void NAME(const T* g_, const T* w_, const T* x, ptrdiff_t n, double shift,        \
                 double* s1, double* s2) {                                                \
    cynorm_v4d zero = {0, 0, 0, 0};                                                       \
    cynorm_v4d k = zero + shift, a[4] = {zero, zero, zero, zero};                         \
    cynorm_v4d q[4] = {zero, zero, zero, zero}, d, g = zero, u;                           \
    double t1, t2, ds, gs = 0;                                                            \
    ptrdiff_t i = 0;                                                                      \
    int v;                                                                                \
    for (; i + 16 <= n; i += 16) {                                                        \
        for (v = 0; v < 4; v++) {                                                         \
            LOAD4(d, x + i + 4 * v);                                                      \
            if (g_) {                                                                     \
                LOAD4(g, g_ + i + 4 * v);                                                 \
                if (w_) {                                                                 \
                    LOAD4(u, w_ + i + 4 * v);                                             \
                    g *= u;                                                               \
                }                                                                         \
            }                                                                             \
            d -= k;                                                                       \
            a[v] += A(d, g);                                                              \
            q[v] += B(d, g);                                                              \
        }                                                                                 \
    }                                                                                     \
    t1 = cynorm_hsum_halves(a[0] + a[2], a[1] + a[3]);                                    \
    t2 = cynorm_hsum_halves(q[0] + q[2], q[1] + q[3]);                                    \
    CYNORM_TWO_SUMS_TAIL(A, B)                                                            \
}

#define CYNORM_LOAD4_D(v, p) memcpy(&(v), (p), sizeof(cynorm_v4d))
/* one vcvtps2pd from memory (__builtin_convertvector here gave two two-float conversions
   and a vinsertf128) */
#define CYNORM_LOAD4_F(v, p) (v) = (cynorm_v4d)_mm256_cvtps_pd(_mm_loadu_ps(p))

CYNORM_INSTANTIATE(CYNORM_LOAD4_F, CYNORM_LOAD4_D)
#else
CYNORM_INSTANTIATE(CYNORM_LOAD8_F, CYNORM_LOAD8_D)
#endif

#else /* portable: four partial sums */

#define CYNORM_TWO_SUMS(NAME, T, LOAD8, A, B)                                             \
static void NAME(const T* g_, const T* w_, const T* x, ptrdiff_t n, double shift,        \
                 double* s1, double* s2) {                                                \
    double a[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0}, d, g = 0;                            \
    ptrdiff_t i = 0;                                                                      \
    int j;                                                                                \
    for (; i + 4 <= n; i += 4) {                                                          \
        for (j = 0; j < 4; j++) {                                                         \
            d = (double)x[i + j] - shift;                                                 \
            if (g_)                                                                       \
                g = (double)g_[i + j] * (w_ ? (double)w_[i + j] : 1.0);                   \
            a[j] += A(d, g);                                                              \
            q[j] += B(d, g);                                                              \
        }                                                                                 \
    }                                                                                     \
    for (; i < n; i++) {                                                                  \
        d = (double)x[i] - shift;                                                         \
        if (g_)                                                                           \
            g = (double)g_[i] * (w_ ? (double)w_[i] : 1.0);                               \
        a[0] += A(d, g);                                                                  \
        q[0] += B(d, g);                                                                  \
    }                                                                                     \
    *s1 = (a[0] + a[1]) + (a[2] + a[3]);                                                  \
    *s2 = (q[0] + q[1]) + (q[2] + q[3]);                                                  \
}

CYNORM_INSTANTIATE(, )

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

/* Column moments, centred sums of four rows (then of one), columns fb..fe:
 *   c[f] += Σ_k (r_k[f] - shift[f]),   q[f] += Σ_k (r_k[f] - shift[f])²
 * The same loop in Cython stayed scalar for float64 rows: rows, shift, c and q could all
 * alias, too many pairs for GCC's run-time alias checks.  restrict says they do not (c and q
 * are scratch rows of their own; the rows are only read). */
#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define CYNORM_RESTRICT __restrict
#else
#define CYNORM_RESTRICT
#endif
#define CYNORM_CENTERED(NAME4, NAME1, T)                                                  \
static inline void NAME4(const T* CYNORM_RESTRICT r0, const T* CYNORM_RESTRICT r1,       \
                         const T* CYNORM_RESTRICT r2, const T* CYNORM_RESTRICT r3,       \
                         const double* CYNORM_RESTRICT shift, double* CYNORM_RESTRICT c, \
                         double* CYNORM_RESTRICT q, ptrdiff_t fb, ptrdiff_t fe) {         \
    ptrdiff_t f;                                                                          \
    double d0, d1, d2, d3;                                                                \
    for (f = fb; f < fe; f++) {                                                           \
        d0 = r0[f] - shift[f];                                                            \
        d1 = r1[f] - shift[f];                                                            \
        d2 = r2[f] - shift[f];                                                            \
        d3 = r3[f] - shift[f];                                                            \
        c[f] += (d0 + d1) + (d2 + d3);                                                    \
        q[f] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);                                \
    }                                                                                     \
}                                                                                         \
static inline void NAME1(const T* CYNORM_RESTRICT r0, const double* CYNORM_RESTRICT shift, \
                         double* CYNORM_RESTRICT c, double* CYNORM_RESTRICT q,           \
                         ptrdiff_t F) {                                                   \
    ptrdiff_t f;                                                                          \
    double d0;                                                                            \
    for (f = 0; f < F; f++) {                                                             \
        d0 = r0[f] - shift[f];                                                            \
        c[f] += d0;                                                                       \
        q[f] += d0 * d0;                                                                  \
    }                                                                                     \
}
CYNORM_CENTERED(cynorm_centered4_f, cynorm_centered1_f, float)
CYNORM_CENTERED(cynorm_centered4_d, cynorm_centered1_d, double)

/* The power of two 2^-E that brings y (positive, finite) into [1, 2): y = m * 2^E, m in [1, 2)
 * for a normal y; 0 when |E| > 120 or y is subnormal, zero, inf or NaN (no scale then).  Bits
 * instead of frexp / ldexp, which are calls into libm: one per feature was a tenth of a small
 * call. */
static inline float cynorm_unit_scale(double y) {
    uint64_t u;
    uint32_t k;
    int e;
    memcpy(&u, &y, 8);
    e = (int)((u >> 52) & 0x7ff) - 1023;
    if (e < -120 || e > 120)
        return 0.0f;
    k = (uint32_t)(127 - e) << 23;
    {
        float out;
        memcpy(&out, &k, 4);
        return out;
    }
}

/* Column moments of float32 rows for BatchNorm's forward pass, scaled deviations in float32:
 *   d = (r[f] - s[f]) * k[f],   c[f] += Σ d,   q[f] += Σ d²
 * with s[f] a float32 shift near the column's mean and k[f] a power of two bringing the
 * deviations near 1 (so neither d² nor the sums over- or underflow float32 on sane data; see
 * column_chunk_moments).  Sixteen rows are summed as a tree in float32 (error at most a few
 * float32 ulps of each group's Σ d²), then added to the float64 accumulators: half the vector
 * operations of the float64 sweep per element, and no conversion per element. */
#define CYNORM_SD(i) const float d##i = (r##i[f] - S) * K
static inline void cynorm_scaled16_f(const float* const* rows, const float* CYNORM_RESTRICT s,
                                     const float* CYNORM_RESTRICT k, double* CYNORM_RESTRICT c,
                                     double* CYNORM_RESTRICT q, ptrdiff_t F) {
    const float* CYNORM_RESTRICT r0 = rows[0];
    const float* CYNORM_RESTRICT r1 = rows[1];
    const float* CYNORM_RESTRICT r2 = rows[2];
    const float* CYNORM_RESTRICT r3 = rows[3];
    const float* CYNORM_RESTRICT r4 = rows[4];
    const float* CYNORM_RESTRICT r5 = rows[5];
    const float* CYNORM_RESTRICT r6 = rows[6];
    const float* CYNORM_RESTRICT r7 = rows[7];
    const float* CYNORM_RESTRICT r8 = rows[8];
    const float* CYNORM_RESTRICT r9 = rows[9];
    const float* CYNORM_RESTRICT r10 = rows[10];
    const float* CYNORM_RESTRICT r11 = rows[11];
    const float* CYNORM_RESTRICT r12 = rows[12];
    const float* CYNORM_RESTRICT r13 = rows[13];
    const float* CYNORM_RESTRICT r14 = rows[14];
    const float* CYNORM_RESTRICT r15 = rows[15];
    ptrdiff_t f;
    for (f = 0; f < F; f++) {
        const float S = s[f], K = k[f];
        CYNORM_SD(0); CYNORM_SD(1); CYNORM_SD(2); CYNORM_SD(3);
        CYNORM_SD(4); CYNORM_SD(5); CYNORM_SD(6); CYNORM_SD(7);
        CYNORM_SD(8); CYNORM_SD(9); CYNORM_SD(10); CYNORM_SD(11);
        CYNORM_SD(12); CYNORM_SD(13); CYNORM_SD(14); CYNORM_SD(15);
        const float sa = ((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7));
        const float sb = ((d8 + d9) + (d10 + d11)) + ((d12 + d13) + (d14 + d15));
        const float qa = ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
                         + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7));
        const float qb = ((d8 * d8 + d9 * d9) + (d10 * d10 + d11 * d11))
                         + ((d12 * d12 + d13 * d13) + (d14 * d14 + d15 * d15));
        c[f] += (double)(sa + sb);
        q[f] += (double)(qa + qb);
    }
}
#undef CYNORM_SD
static inline void cynorm_scaled1_f(const float* CYNORM_RESTRICT r0,
                                    const float* CYNORM_RESTRICT s,
                                    const float* CYNORM_RESTRICT k, double* CYNORM_RESTRICT c,
                                    double* CYNORM_RESTRICT q, ptrdiff_t F) {
    ptrdiff_t f;
    for (f = 0; f < F; f++) {
        const float d = (r0[f] - s[f]) * k[f];
        c[f] += (double)d;
        q[f] += (double)(d * d);
    }
}

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

/* BatchNorm backward, four rows of an (N, F) float32 array at a time, down the columns:
 *   sg[f] += (g0 + g1) + (g2 + g3),   sgx[f] += (g0 (x0 - m) + g1 (x1 - m)) + (g2 (x2 - m) + g3 (x3 - m))
 * the four-row partials in float32, added to the float64 sums (one conversion per four rows).
 * With d0 not NULL, also eval mode's dx of the four rows, d_r[f] = k[f] g_r[f] (rows of dx ld
 * apart): written while g is in registers, in the same sweep (one pass over g, x and dx), with
 * streaming stores when nt (as in cynorm_ln_paramgrads4_f: the columns before the rows'
 * 32-byte boundary and after the last whole vector take the same vector step, masked). */
#if defined(__GNUC__) || defined(__clang__)
static inline void cynorm_bn_colsums_step(const float* g0, const float* g1, const float* g2,
                                          const float* g3, const float* x0, const float* x1,
                                          const float* x2, const float* x3, const float* m,
                                          double* sg, double* sgx, ptrdiff_t f, ptrdiff_t n,
                                          const float* k, float* d0, ptrdiff_t ld, int nt) {
    cynorm_v8f a0 = cynorm_ldf(g0 + f, n), a1 = cynorm_ldf(g1 + f, n);
    cynorm_v8f a2 = cynorm_ldf(g2 + f, n), a3 = cynorm_ldf(g3 + f, n);
    cynorm_v8f mv = cynorm_ldf(m + f, n), kv, s, q;
    cynorm_v8f b0 = cynorm_ldf(x0 + f, n) - mv, b1 = cynorm_ldf(x1 + f, n) - mv;
    cynorm_v8f b2 = cynorm_ldf(x2 + f, n) - mv, b3 = cynorm_ldf(x3 + f, n) - mv;
    if (d0) {
        kv = cynorm_ldf(k + f, n);
        cynorm_stf(d0 + f, kv * a0, n, nt);
        cynorm_stf(d0 + ld + f, kv * a1, n, nt);
        cynorm_stf(d0 + 2 * ld + f, kv * a2, n, nt);
        cynorm_stf(d0 + 3 * ld + f, kv * a3, n, nt);
    }
    s = (a0 + a1) + (a2 + a3);
    q = (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);
    cynorm_acc8(sg + f, s, n);
    cynorm_acc8(sgx + f, q, n);
}
#endif

static void cynorm_bn_colsums4_f(const float* g0, const float* g1, const float* g2,
                                 const float* g3, const float* x0, const float* x1,
                                 const float* x2, const float* x3, const float* m,
                                 double* sg, double* sgx, ptrdiff_t F,
                                 const float* k, float* d0, ptrdiff_t ld, int nt) {
    ptrdiff_t f = 0, head = 0;
    if (nt) {
        head = d0 ? cynorm_nt_head(d0, ld, F) : -1;
        nt = head >= 0;
        head = nt ? head : 0;
    }
#if defined(__GNUC__) || defined(__clang__)
    {
        /* the next four rows (rows are contiguous runs, so they follow: g3 + (g3 - g2) ...):
           ask for them one cache line ahead of use each, since these short row streams (a few
           KB each) restart every four rows, too short for the hardware prefetcher to catch
           (prefetching an address past the array never faults) */
        const ptrdiff_t lg = g1 - g0, lx = x1 - x0;
        const float* gn = g3 + lg;
        const float* xn = x3 + lx;
        if (head > 0)
            cynorm_bn_colsums_step(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, 0, head, k, d0,
                                   ld, 0);
        for (f = head; f + 8 <= F; f += 8) {
            if (((f - head) & 15) == 0) {
                cynorm_prefetch(gn + f); cynorm_prefetch(gn + lg + f);
                cynorm_prefetch(gn + 2 * lg + f); cynorm_prefetch(gn + 3 * lg + f);
                cynorm_prefetch(xn + f); cynorm_prefetch(xn + lx + f);
                cynorm_prefetch(xn + 2 * lx + f); cynorm_prefetch(xn + 3 * lx + f);
            }
            cynorm_bn_colsums_step(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, f, 8, k, d0, ld,
                                   nt);
        }
        if (f < F)
            cynorm_bn_colsums_step(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, f, F - f, k, d0,
                                   ld, 0);
    }
#else
    for (; f < F; f++) {
        if (d0) {
            d0[f] = k[f] * g0[f];
            d0[ld + f] = k[f] * g1[f];
            d0[2 * ld + f] = k[f] * g2[f];
            d0[3 * ld + f] = k[f] * g3[f];
        }
        sg[f] += (double)((g0[f] + g1[f]) + (g2[f] + g3[f]));
        sgx[f] += (double)((g0[f] * (x0[f] - m[f]) + g1[f] * (x1[f] - m[f]))
                           + (g2[f] * (x2[f] - m[f]) + g3[f] * (x3[f] - m[f])));
    }
#endif
}

/* cynorm_bn_colsums4_f for float64 rows (rows of dx d0..d3, or d0 NULL: no dx), in one loop
 * over the columns.  In Cython it was three (Σg, Σg (x - m), then dx row by row), which loaded
 * g three times; restrict lets GCC vectorize the one loop without run-time alias checks (the
 * output rows and sums are the caller's own).  The same operations in the same order. */
#define CYNORM_BN_COLSUMS4_D_BODY                                                         \
    a0 = g0[f];                                                                           \
    a1 = g1[f];                                                                           \
    a2 = g2[f];                                                                           \
    a3 = g3[f];                                                                           \
    mm = m[f];                                                                            \
    sg[f] += (a0 + a1) + (a2 + a3);                                                       \
    sgx[f] += ((a0 * (x0[f] - mm) + a1 * (x1[f] - mm)) + (a2 * (x2[f] - mm) + a3 * (x3[f] - mm)));
static void cynorm_bn_colsums4_d(const double* CYNORM_RESTRICT g0,
                                 const double* CYNORM_RESTRICT g1,
                                 const double* CYNORM_RESTRICT g2,
                                 const double* CYNORM_RESTRICT g3,
                                 const double* CYNORM_RESTRICT x0,
                                 const double* CYNORM_RESTRICT x1,
                                 const double* CYNORM_RESTRICT x2,
                                 const double* CYNORM_RESTRICT x3,
                                 const double* CYNORM_RESTRICT m, double* CYNORM_RESTRICT sg,
                                 double* CYNORM_RESTRICT sgx, ptrdiff_t F,
                                 const double* CYNORM_RESTRICT k, double* CYNORM_RESTRICT d0,
                                 double* CYNORM_RESTRICT d1, double* CYNORM_RESTRICT d2,
                                 double* CYNORM_RESTRICT d3) {
    ptrdiff_t f;
    double a0, a1, a2, a3, mm;
    if (d0) {
        for (f = 0; f < F; f++) {
            CYNORM_BN_COLSUMS4_D_BODY
            d0[f] = k[f] * a0;
            d1[f] = k[f] * a1;
            d2[f] = k[f] * a2;
            d3[f] = k[f] * a3;
        }
    } else {
        for (f = 0; f < F; f++) {
            CYNORM_BN_COLSUMS4_D_BODY
        }
    }
}

/* LayerNorm backward sums of one float32 row, with g' = g w (w may be NULL) and
 * d = (x - mh) - ml (the row mean split in two floats, as dx uses it):
 *   sg = Σ g',   sgx = Σ g' d
 * g' and g' d in float32, two of each added in float32 before each float64 addition: two
 * conversions per sixteen elements instead of six (the error is float32 rounding of single
 * terms, not growing with the row). */
static void cynorm_ln_gx_sums_f(const float* g, const float* w, const float* x, ptrdiff_t n,
                                float mh, float ml, double* sg, double* sgx, ptrdiff_t ahead_g,
                                ptrdiff_t ahead_x) {
    ptrdiff_t i = 0;
    double t1 = 0.0, t2 = 0.0;
    float gw, d;
#if defined(__GNUC__) || defined(__clang__)
    cynorm_v8f z = {0, 0, 0, 0, 0, 0, 0, 0};
    cynorm_v8f vh = z + mh, vl = z + ml, a, b, c, e, u, v;
#if CYNORM_AVX2_BUILD
    cynorm_v4d s1lo = {0, 0, 0, 0}, s1hi = s1lo, s2lo = s1lo, s2hi = s1lo;
#else
    cynorm_v8d zd = {0, 0, 0, 0, 0, 0, 0, 0}, s1 = zd, s2 = zd;
#endif
    for (; i + 16 <= n; i += 16) {
        if (ahead_g) {  /* a later row of g and x, a line at a time (0: none) */
            cynorm_prefetch(g + i + ahead_g);
            cynorm_prefetch(x + i + ahead_x);
        }
        memcpy(&a, g + i, 32); memcpy(&b, g + i + 8, 32);
        if (w) {
            memcpy(&u, w + i, 32); memcpy(&v, w + i + 8, 32);
            a *= u;
            b *= v;
        }
        memcpy(&c, x + i, 32); memcpy(&e, x + i + 8, 32);
        c = (c - vh) - vl;
        e = (e - vh) - vl;
#if CYNORM_AVX2_BUILD
        {
            cynorm_v8f ab = a + b, ce = a * c + b * e;
            s1lo += cynorm_widen_lo(ab);
            s1hi += cynorm_widen_hi(ab);
            s2lo += cynorm_widen_lo(ce);
            s2hi += cynorm_widen_hi(ce);
        }
#else
        s1 += cynorm_widen(a + b);
        s2 += cynorm_widen(a * c + b * e);
#endif
    }
#if CYNORM_AVX2_BUILD
    t1 = cynorm_hsum_halves(s1lo, s1hi);
    t2 = cynorm_hsum_halves(s2lo, s2hi);
#else
    t1 = cynorm_hsum(s1);
    t2 = cynorm_hsum(s2);
#endif
#endif
    for (; i < n; i++) {
        gw = w ? g[i] * w[i] : g[i];
        d = (x[i] - mh) - ml;
        t1 += (double)gw;
        t2 += (double)(gw * d);
    }
    *sg = t1;
    *sgx = t2;
}

/* LayerNorm backward dx of one float32 row, from its row sums af = mean(g'), cf and the
 * deviation d = (x - mh) - ml (w may be NULL):
 *   dx[j] = rs (g[j] w[j] - af) - cf d[j]
 * each operation rounded once (CYNORM_UNFUSED), in every path (four-row sweeps, single rows,
 * masked rows, the elements before and after the whole vectors).  Where the compiler fused a
 * multiply and an add depended on the context, and the context of an element on where the
 * output lay (the streamed sweeps start their vectors at the rows' 32-byte boundary): dx
 * changed in its last bit with the output's address. */
#if defined(__GNUC__) || defined(__clang__)
/* v is used as it is: no multiply-add fused across this point (an empty asm statement the
   compiler cannot see through), so each operation rounds once, in every context, as in a
   build without FMA */
#if defined(__FMA__) || defined(__AVX512F__)
#define CYNORM_UNFUSED(v) __asm__("" : "+v"(v))
#else
#define CYNORM_UNFUSED(v) ((void)0)
#endif

/* The body of cynorm_ln_dx8 for any float vector type T (the baseline build's four-float
   sweep uses it too): returns rs (g w - af) - cf d, w NULL: g */
#define CYNORM_LN_DX(T, g, d, w, wv, rs, af, cf)                                          \
    {                                                                                     \
        T gw_ = (w) ? (g) * (wv) : (g), u_, t_;                                           \
        CYNORM_UNFUSED(gw_);                                                              \
        u_ = (rs) * (gw_ - (af));                                                         \
        CYNORM_UNFUSED(u_);                                                               \
        t_ = (cf) * (d);                                                                  \
        CYNORM_UNFUSED(t_);                                                               \
        return u_ - t_;                                                                   \
    }

static inline cynorm_v8f cynorm_ln_dx8(cynorm_v8f g, cynorm_v8f d, const float* w, cynorm_v8f wv,
                                       float rs, float af, float cf)
    CYNORM_LN_DX(cynorm_v8f, g, d, w, wv, rs, af, cf)

/* One step of cynorm_ln_paramgrads4_f: the n (1 to 8) elements at j (dr[0] NULL: no dx) */
static inline void cynorm_ln_pg_step(const float* const* gr, const float* const* xr,
                                     ptrdiff_t j, ptrdiff_t n, const float* h, const float* l,
                                     const float* r, const float* p, const float* q,
                                     const float* w, float* const* dr, double* dw, double* db,
                                     int nt) {
    cynorm_v8f a[4], b[4], s, wv = {0, 0, 0, 0, 0, 0, 0, 0};
    int k;
    for (k = 0; k < 4; k++) {
        a[k] = cynorm_ldf(gr[k] + j, n);
        b[k] = cynorm_ldf(xr[k] + j, n);
        b[k] = (b[k] - h[k]) - l[k];
    }
    if (dr[0]) {
        if (w)
            wv = cynorm_ldf(w + j, n);
        for (k = 0; k < 4; k++)
            cynorm_stf(dr[k] + j, cynorm_ln_dx8(a[k], b[k], w, wv, r[k], p[k], q[k]), n, nt);
    }
    if (dw) {
        s = (a[0] * (b[0] * r[0]) + a[1] * (b[1] * r[1]))
            + (a[2] * (b[2] * r[2]) + a[3] * (b[3] * r[3]));
        cynorm_acc8(dw + j, s, n);
    }
    if (db) {
        s = (a[0] + a[1]) + (a[2] + a[3]);
        cynorm_acc8(db + j, s, n);
    }
}

#if CYNORM_SSE2_BUILD
static inline cynorm_v4f cynorm_ln_dx4(cynorm_v4f g, cynorm_v4f d, const float* w, cynorm_v4f wv,
                                       float rs, float af, float cf)
    CYNORM_LN_DX(cynorm_v4f, g, d, w, wv, rs, af, cf)

/* p[0:4] += s in float64 */
static inline void cynorm_acc4(double* p, cynorm_v4f s) {
    __m128d lo = _mm_cvtps_pd((__m128)s), hi = _mm_cvtps_pd(_mm_movehl_ps((__m128)s, (__m128)s));
    _mm_storeu_pd(p, _mm_add_pd(_mm_loadu_pd(p), lo));
    _mm_storeu_pd(p + 2, _mm_add_pd(_mm_loadu_pd(p + 2), hi));
}

/* cynorm_ln_pg_step in four columns (the same operations in the same order: the same bits) */
static inline void cynorm_ln_pg_step4(const float* const* gr, const float* const* xr,
                                      ptrdiff_t j, const float* h, const float* l,
                                      const float* r, const float* p, const float* q,
                                      const float* w, float* const* dr, double* dw,
                                      double* db) {
    cynorm_v4f a[4], b[4], s, u, wv = {0, 0, 0, 0};
    int k;
    for (k = 0; k < 4; k++) {
        memcpy(&a[k], gr[k] + j, 16);
        memcpy(&b[k], xr[k] + j, 16);
        b[k] = (b[k] - h[k]) - l[k];
    }
    if (dr[0]) {
        if (w)
            memcpy(&wv, w + j, 16);
        for (k = 0; k < 4; k++) {
            u = cynorm_ln_dx4(a[k], b[k], w, wv, r[k], p[k], q[k]);
            memcpy(dr[k] + j, &u, 16);
        }
    }
    if (dw) {
        s = (a[0] * (b[0] * r[0]) + a[1] * (b[1] * r[1]))
            + (a[2] * (b[2] * r[2]) + a[3] * (b[3] * r[3]));
        cynorm_acc4(dw + j, s);
    }
    if (db) {
        s = (a[0] + a[1]) + (a[2] + a[3]);
        cynorm_acc4(db + j, s);
    }
}
#endif

/* dx of one row (the rows outside cynorm_ln_paramgrads4_f's groups of four) */
static void cynorm_ln_dx_row_f(const float* g, const float* w, const float* x, float* dx,
                               ptrdiff_t n, float mh, float ml, float rs, float af, float cf) {
    cynorm_v8f b, wv = {0, 0, 0, 0, 0, 0, 0, 0};
    ptrdiff_t j, m;
    for (j = 0; j < n; j += 8) {
        m = n - j < 8 ? n - j : 8;
        b = (cynorm_ldf(x + j, m) - mh) - ml;
        if (w)
            wv = cynorm_ldf(w + j, m);
        cynorm_stf(dx + j, cynorm_ln_dx8(cynorm_ldf(g + j, m), b, w, wv, rs, af, cf), m, 0);
    }
}
#else
static void cynorm_ln_dx_row_f(const float* g, const float* w, const float* x, float* dx,
                               ptrdiff_t n, float mh, float ml, float rs, float af, float cf) {
    ptrdiff_t j;
    for (j = 0; j < n; j++)
        dx[j] = rs * ((w ? g[j] * w[j] : g[j]) - af) - cf * ((x[j] - mh) - ml);
}
#endif

/* LayerNorm backward, the parameter gradients of four rows at a time (dw or db may be NULL):
 *   dw[j] += Σ_k g_k[j] ((x_k[j] - mh_k) - ml_k) rs_k,   db[j] += Σ_k g_k[j]
 * the four-row partials in float32, added to the float64 sums.  With dx not NULL, also the
 * four rows' dx in the same sweep, from their row sums af_k = mean(g'), cf_k (w may be NULL;
 * cynorm_ln_dx8), written with streaming stores when nt (from the rows' 32-byte boundary on;
 * the elements before it, and after the last whole vector, with masked loads and stores). */
static void cynorm_ln_paramgrads4_f(const float* const* g, const float* const* x,
                                    const float* mh, const float* ml, const float* rs,
                                    double* dw, double* db, ptrdiff_t D, const float* w,
                                    const float* af, const float* cf, float* const* dx,
                                    int nt) {
    ptrdiff_t j = 0, head = 0;
    int k;
    /* the row pointers and per-row scalars in locals: stores to dx, dw and db could alias
       the arrays they came from, which would make the compiler reload them every step */
    const float* gr[4] = {g[0], g[1], g[2], g[3]};
    const float* xr[4] = {x[0], x[1], x[2], x[3]};
    float* dr[4] = {NULL, NULL, NULL, NULL};
    float h[4] = {mh[0], mh[1], mh[2], mh[3]}, l[4] = {ml[0], ml[1], ml[2], ml[3]};
    float r[4] = {rs[0], rs[1], rs[2], rs[3]}, p[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
    if (dx)
        for (k = 0; k < 4; k++) {
            dr[k] = dx[k];
            p[k] = af[k];
            q[k] = cf[k];
        }
#if CYNORM_AVX2_BUILD || CYNORM_SSE2_BUILD
    /* Plain stores below AVX-512: streamed, this sweep took 4-5 times as long on a Zen 3 with
       AVX2 (LN backward (16384, 1024) float32, 1 thread, 101 against 34 ms), and neither
       filling each line with two stores in a row nor streaming row after row helped where the
       rows are 4 KiB apart (benchmarks/RESULTS.md, items 55 and 63). */
    nt = 0;
#endif
    if (nt) {
        head = dx ? cynorm_nt_head(dr[0], dr[1] - dr[0], D) : -1;
        nt = head >= 0;
        head = nt ? head : 0;
    }
#if CYNORM_SSE2_BUILD
    /* four columns at a time (eight-float steps made each per-row scalar into a vector
       through the stack, every step: LN backward (2048, 768) float32 took 3-4 times as long),
       then the scalar loop below for the last few */
    for (j = 0; j + 4 <= D; j += 4)
        cynorm_ln_pg_step4(gr, xr, j, h, l, r, p, q, w, dr, dw, db);
#elif defined(__GNUC__) || defined(__clang__)
    if (head > 0)
        cynorm_ln_pg_step(gr, xr, 0, head, h, l, r, p, q, w, dr, dw, db, 0);
    for (j = head; j + 8 <= D; j += 8)
        cynorm_ln_pg_step(gr, xr, j, 8, h, l, r, p, q, w, dr, dw, db, nt);
    if (j < D)
        cynorm_ln_pg_step(gr, xr, j, D - j, h, l, r, p, q, w, dr, dw, db, 0);
#endif
#if CYNORM_SSE2_BUILD || !(defined(__GNUC__) || defined(__clang__))
    {
        float d[4], t;
        for (; j < D; j++) {
            for (k = 0; k < 4; k++)
                d[k] = (xr[k][j] - h[k]) - l[k];
            if (dx)
                for (k = 0; k < 4; k++)
                    dr[k][j] = r[k] * ((w ? gr[k][j] * w[j] : gr[k][j]) - p[k]) - q[k] * d[k];
            if (dw) {
                t = (gr[0][j] * (d[0] * r[0]) + gr[1][j] * (d[1] * r[1]))
                    + (gr[2][j] * (d[2] * r[2]) + gr[3][j] * (d[3] * r[3]));
                dw[j] += (double)t;
            }
            if (db)
                db[j] += (double)((gr[0][j] + gr[1][j]) + (gr[2][j] + gr[3][j]));
        }
    }
#endif
}

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

/* BatchNorm training backward, dx = k1 g + (k2 (x - mh) + k3), per-element coefficients
 * (feature-last rows, _vec) or one of each (rows of one feature, _scalar) */
#define CYNORM_BN_DX_NT(NAME, T, VT, STREAM)                                              \
static void NAME##_vec(const T* g, const T* x, T* dx, ptrdiff_t n, const T* mh,           \
                       const T* k1, const T* k2, const T* k3) {                           \
    VT gv, xv, mv, av, bv, cv;                                                            \
    CYNORM_NT_ROW(T, dx, n, dx[j] = k1[j] * g[j] + (k2[j] * (x[j] - mh[j]) + k3[j]),      \
        memcpy(&gv, g + j, sizeof gv);                                                    \
        memcpy(&xv, x + j, sizeof xv);                                                    \
        memcpy(&mv, mh + j, sizeof mv);                                                   \
        memcpy(&av, k1 + j, sizeof av);                                                   \
        memcpy(&bv, k2 + j, sizeof bv);                                                   \
        memcpy(&cv, k3 + j, sizeof cv);                                                   \
        STREAM(dx + j, av * gv + (bv * (xv - mv) + cv)));                                 \
}                                                                                         \
static void NAME##_scalar(const T* g, const T* x, T* dx, ptrdiff_t n, T mh, T k1, T k2,   \
                          T k3) {                                                         \
    VT gv, xv;                                                                            \
    CYNORM_NT_ROW(T, dx, n, dx[j] = k1 * g[j] + (k2 * (x[j] - mh) + k3),                  \
        memcpy(&gv, g + j, sizeof gv);                                                    \
        memcpy(&xv, x + j, sizeof xv);                                                    \
        STREAM(dx + j, k1 * gv + (k2 * (xv - mh) + k3)));                                 \
}

CYNORM_APPLY_NT(cynorm_apply_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_APPLY_NT(cynorm_apply_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)
CYNORM_ZERO_NT(cynorm_zero_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_ZERO_NT(cynorm_zero_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)
CYNORM_BN_DX_NT(cynorm_bn_dx_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_BN_DX_NT(cynorm_bn_dx_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)

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
CYNORM_APPLY_PLAIN(cynorm_apply_nt_f, float)
CYNORM_APPLY_PLAIN(cynorm_apply_nt_d, double)

#define CYNORM_BN_DX_PLAIN(NAME, T)                                                       \
static void NAME##_vec(const T* g, const T* x, T* dx, ptrdiff_t n, const T* mh,          \
                       const T* k1, const T* k2, const T* k3) {                           \
    ptrdiff_t j;                                                                          \
    for (j = 0; j < n; j++)                                                               \
        dx[j] = k1[j] * g[j] + (k2[j] * (x[j] - mh[j]) + k3[j]);                          \
}                                                                                         \
static void NAME##_scalar(const T* g, const T* x, T* dx, ptrdiff_t n, T mh, T k1, T k2,  \
                          T k3) {                                                         \
    ptrdiff_t j;                                                                          \
    for (j = 0; j < n; j++)                                                               \
        dx[j] = k1 * g[j] + (k2 * (x[j] - mh) + k3);                                      \
}

CYNORM_BN_DX_PLAIN(cynorm_bn_dx_nt_f, float)
CYNORM_BN_DX_PLAIN(cynorm_bn_dx_nt_d, double)

#endif

#endif /* CYNORM_SIMD_H */
