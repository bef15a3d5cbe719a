/* GroupNorm / InstanceNorm's channels-last apply: a sample is an (S, C) array of short rows,
 * so y_r[f] = (x_r[f] - mh[f]) * sc[f] + sh[f] goes a block of columns at a time down the
 * rows, the block's three parameters held in registers (32 floats or 16 doubles of each:
 * twelve AVX2 registers) instead of reloaded for every row.  The column moments' counterpart
 * is core/sums.h's cynorm_centered_cols_*.
 */
#ifndef CYNORM_OPS_GROUP_NORM_H
#define CYNORM_OPS_GROUP_NORM_H

#include <stddef.h>
#include "../core/simd.h"
#include "../core/stores.h"

/* rows r0..r1 of an (S, F) array (row stride F); rows the mask (one byte per row, or NULL)
 * drops are left alone.  Vector extensions: a block is four vectors of each parameter, two
 * whole cache lines of a row.  nt (AVX builds): streaming stores, for y 64-byte aligned with
 * rows a whole number of lines (the caller checks); each line is then written by two
 * consecutive stores, whole (see CYNORM_NT_ROW on lines written partly streamed). */
#if defined(__GNUC__) || defined(__clang__)
typedef float cynorm_gn_vf __attribute__((vector_size(32), aligned(4)));
typedef double cynorm_gn_vd __attribute__((vector_size(32), aligned(8)));
#if defined(__AVX__)
#define CYNORM_GN_PUT_float(p, v, nt)                                                     \
    do { if (nt) _mm256_stream_ps((float*)(p), (__m256)(v)); else *(cynorm_gn_vf*)(p) = (v); } while (0)
#define CYNORM_GN_PUT_double(p, v, nt)                                                    \
    do { if (nt) _mm256_stream_pd((double*)(p), (__m256d)(v)); else *(cynorm_gn_vd*)(p) = (v); } while (0)
#else
#define CYNORM_GN_PUT_float(p, v, nt) (*(cynorm_gn_vf*)(p) = (v))
#define CYNORM_GN_PUT_double(p, v, nt) (*(cynorm_gn_vd*)(p) = (v))
#endif
#define CYNORM_GN_APPLY(NAME, T, V, L)                                                    \
static inline void NAME(const T* CYNORM_RESTRICT x, T* CYNORM_RESTRICT y, ptrdiff_t r0,   \
                        ptrdiff_t r1, ptrdiff_t F, const T* mh, const T* sc, const T* sh, \
                        const unsigned char* mask, int nt) {                              \
    ptrdiff_t fb = 0, r, j;                                                               \
    for (; fb + 4 * L <= F; fb += 4 * L) {                                                \
        const V m0 = *(const V*)(mh + fb), m1 = *(const V*)(mh + fb + L);                 \
        const V m2 = *(const V*)(mh + fb + 2 * L), m3 = *(const V*)(mh + fb + 3 * L);     \
        const V s0 = *(const V*)(sc + fb), s1 = *(const V*)(sc + fb + L);                 \
        const V s2 = *(const V*)(sc + fb + 2 * L), s3 = *(const V*)(sc + fb + 3 * L);     \
        const V t0 = *(const V*)(sh + fb), t1 = *(const V*)(sh + fb + L);                 \
        const V t2 = *(const V*)(sh + fb + 2 * L), t3 = *(const V*)(sh + fb + 3 * L);     \
        for (r = r0; r < r1; r++) {                                                       \
            const T* xr = x + r * F + fb;                                                 \
            T* yr = y + r * F + fb;                                                       \
            if (mask && !mask[r])                                                         \
                continue;                                                                 \
            const V v0 = (*(const V*)xr - m0) * s0 + t0;                                  \
            const V v1 = (*(const V*)(xr + L) - m1) * s1 + t1;                            \
            const V v2 = (*(const V*)(xr + 2 * L) - m2) * s2 + t2;                        \
            const V v3 = (*(const V*)(xr + 3 * L) - m3) * s3 + t3;                        \
            CYNORM_GN_PUT_##T(yr, v0, nt);                                                \
            CYNORM_GN_PUT_##T(yr + L, v1, nt);                                            \
            CYNORM_GN_PUT_##T(yr + 2 * L, v2, nt);                                        \
            CYNORM_GN_PUT_##T(yr + 3 * L, v3, nt);                                        \
        }                                                                                 \
    }                                                                                     \
    if (fb < F) {                                                                         \
        for (r = r0; r < r1; r++) {                                                       \
            const T* xr = x + r * F;                                                      \
            T* yr = y + r * F;                                                            \
            if (mask && !mask[r])                                                         \
                continue;                                                                 \
            for (j = fb; j < F; j++)                                                      \
                yr[j] = (xr[j] - mh[j]) * sc[j] + sh[j];                                  \
        }                                                                                 \
    }                                                                                     \
}
CYNORM_GN_APPLY(cynorm_gn_apply_f, float, cynorm_gn_vf, 8)
CYNORM_GN_APPLY(cynorm_gn_apply_d, double, cynorm_gn_vd, 4)
#endif

#endif /* CYNORM_OPS_GROUP_NORM_H */
