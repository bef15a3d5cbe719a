/* cynorm: the one reduction GCC will not vectorize well from plain loops.
 *
 * Shifted sums of a contiguous block: s1 = sum(x - shift), s2 = sum((x - shift)^2), in float64.
 * Written as plain loops over LANES partial sums, GCC vectorizes the float32 version by SLP
 * but turns the float64 one into permute-heavy interleaved loads (3-4x slower).  GCC and Clang
 * get explicit 8 x float64 vectors here (two of them, for latency); every other compiler gets
 * four scalar partial sums.  No reassociation beyond the partial sums: NaN and inf propagate.
 */
#ifndef CYNORM_SIMD_H
#define CYNORM_SIMD_H

#include <stddef.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)

typedef double cynorm_v8d __attribute__((vector_size(64)));
typedef float cynorm_v8f __attribute__((vector_size(32)));

static inline double cynorm_hsum(cynorm_v8d v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

#define CYNORM_SHIFTED_SUMS(NAME, T, LOAD8)                                              \
static void NAME(const T* x, ptrdiff_t n, double shift, double* s1, double* s2) {       \
    cynorm_v8d zero = {0, 0, 0, 0, 0, 0, 0, 0};                                           \
    cynorm_v8d k = zero + shift, a0 = zero, a1 = zero, q0 = zero, q1 = zero, u, w;        \
    ptrdiff_t i = 0;                                                                      \
    double t1, t2, d;                                                                     \
    for (; i + 16 <= n; i += 16) {                                                        \
        LOAD8(u, x + i);                                                                  \
        LOAD8(w, x + i + 8);                                                              \
        u -= k;                                                                           \
        w -= k;                                                                           \
        a0 += u;                                                                          \
        a1 += w;                                                                          \
        q0 += u * u;                                                                      \
        q1 += w * w;                                                                      \
    }                                                                                     \
    t1 = cynorm_hsum(a0 + a1);                                                            \
    t2 = cynorm_hsum(q0 + q1);                                                            \
    for (; i < n; i++) {                                                                  \
        d = (double)x[i] - shift;                                                         \
        t1 += d;                                                                          \
        t2 += d * d;                                                                      \
    }                                                                                     \
    *s1 = t1;                                                                             \
    *s2 = t2;                                                                             \
}

#define CYNORM_LOAD8_D(v, p) memcpy(&(v), (p), sizeof(cynorm_v8d))
#define CYNORM_LOAD8_F(v, p)                                                              \
    do {                                                                                  \
        cynorm_v8f f_;                                                                    \
        memcpy(&f_, (p), sizeof(cynorm_v8f));                                             \
        (v) = __builtin_convertvector(f_, cynorm_v8d);                                    \
    } while (0)

CYNORM_SHIFTED_SUMS(cynorm_shifted_sums_f, float, CYNORM_LOAD8_F)
CYNORM_SHIFTED_SUMS(cynorm_shifted_sums_d, double, CYNORM_LOAD8_D)

#else /* portable: four partial sums */

#define CYNORM_SHIFTED_SUMS(NAME, T)                                                      \
static void NAME(const T* x, ptrdiff_t n, double shift, double* s1, double* s2) {       \
    double a[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0}, d;                                   \
    ptrdiff_t i = 0;                                                                      \
    int j;                                                                                \
    for (; i + 4 <= n; i += 4) {                                                          \
        for (j = 0; j < 4; j++) {                                                         \
            d = (double)x[i + j] - shift;                                                 \
            a[j] += d;                                                                    \
            q[j] += d * d;                                                                \
        }                                                                                 \
    }                                                                                     \
    for (; i < n; i++) {                                                                  \
        d = (double)x[i] - shift;                                                         \
        a[0] += d;                                                                        \
        q[0] += d * d;                                                                    \
    }                                                                                     \
    *s1 = (a[0] + a[1]) + (a[2] + a[3]);                                                  \
    *s2 = (q[0] + q[1]) + (q[2] + q[3]);                                                  \
}

CYNORM_SHIFTED_SUMS(cynorm_shifted_sums_f, float)
CYNORM_SHIFTED_SUMS(cynorm_shifted_sums_d, double)

#endif

#endif /* CYNORM_SIMD_H */
