/* BatchNorm backward's vector loops: the column sums of four (N, F) rows at a time (with eval
 * mode's dx in the same sweep), and the training dx rows with streaming stores.
 */
#ifndef CYNORM_OPS_BATCH_NORM_H
#define CYNORM_OPS_BATCH_NORM_H

#include "../core/simd.h"
#include "../core/stores.h"

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


#if CYNORM_STREAMING

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

CYNORM_BN_DX_NT(cynorm_bn_dx_nt_f, float, cynorm_ntf, CYNORM_STREAM_F)
CYNORM_BN_DX_NT(cynorm_bn_dx_nt_d, double, cynorm_ntd, CYNORM_STREAM_D)

#else

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

#endif /* CYNORM_OPS_BATCH_NORM_H */
