/* cynorm core: the two-sum reductions, and the column sums of BatchNorm's feature layouts.
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
#ifndef CYNORM_CORE_SUMS_H
#define CYNORM_CORE_SUMS_H

#include "simd.h"

/* An element as a double, in the loops' tails (core/halves.h instantiates them again on
   16-bit elements with its own) */
#define CYNORM_SCALAR(v) ((double)(v))

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

/* s1 += A, s2 += B over x[0:n] (and g[0:n]), where d = x - shift; A and B are expressions in
   d and g: (d, d * d) for the moments, (g, g * d) for the backward sums. */

/* The elements after the last whole sixteen, one at a time in float64, then the results. */
#define CYNORM_TWO_SUMS_TAIL(A, B)                                                        \
    for (; i < n; i++) {                                                                  \
        ds = CYNORM_SCALAR(x[i]) - shift;                                                 \
        if (g_)                                                                           \
            gs = CYNORM_SCALAR(g_[i]) * (w_ ? CYNORM_SCALAR(w_[i]) : 1.0);                \
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
            d = CYNORM_SCALAR(x[i + j]) - shift;                                          \
            if (g_)                                                                       \
                g = CYNORM_SCALAR(g_[i + j]) * (w_ ? CYNORM_SCALAR(w_[i + j]) : 1.0);     \
            a[j] += A(d, g);                                                              \
            q[j] += B(d, g);                                                              \
        }                                                                                 \
    }                                                                                     \
    for (; i < n; i++) {                                                                  \
        d = CYNORM_SCALAR(x[i]) - shift;                                                  \
        if (g_)                                                                           \
            g = CYNORM_SCALAR(g_[i]) * (w_ ? CYNORM_SCALAR(w_[i]) : 1.0);                 \
        a[0] += A(d, g);                                                                  \
        q[0] += B(d, g);                                                                  \
    }                                                                                     \
    *s1 = (a[0] + a[1]) + (a[2] + a[3]);                                                  \
    *s2 = (q[0] + q[1]) + (q[2] + q[3]);                                                  \
}

CYNORM_INSTANTIATE(, )

#endif

/* Column moments, centred sums of four rows (then of one), columns fb..fe:
 *   c[f] += Σ_k (r_k[f] - shift[f]),   q[f] += Σ_k (r_k[f] - shift[f])²
 * The same loop in Cython stayed scalar for float64 rows: rows, shift, c and q could all
 * alias, too many pairs for GCC's run-time alias checks.  restrict says they do not (c and q
 * are scratch rows of their own; the rows are only read). */
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

#endif /* CYNORM_CORE_SUMS_H */
