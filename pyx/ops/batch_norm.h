/* BatchNorm backward's vector loops: the column sums of four (N, F) rows at a time (with eval
 * mode's dx in the same sweep), and the training dx rows with streaming stores.
 */
#ifndef CYNORM_OPS_BATCH_NORM_H
#define CYNORM_OPS_BATCH_NORM_H

#include "../core/simd.h"
#include "../core/stores.h"
#include "../core/halves.h"

/* BatchNorm backward, four rows of an (N, F) float32 array at a time, down the columns:
 *   sg[f] += (g0 + g1) + (g2 + g3),   sgx[f] += (g0 (x0 - m) + g1 (x1 - m)) + (g2 (x2 - m) + g3 (x3 - m))
 * the four-row partials in float32, added to the float64 sums (one conversion per four rows).
 * With d0 not NULL, also eval mode's dx of the four rows, d_r[f] = k[f] g_r[f] (rows of dx ld
 * apart): written while g is in registers, in the same sweep (one pass over g, x and dx), with
 * streaming stores when nt (as in cynorm_ln_paramgrads4_f: the columns before the rows'
 * 32-byte boundary and after the last whole vector take the same vector step, masked). */
#if defined(__GNUC__) || defined(__clang__)
/* One step of the sweep, the n (1 to 8) columns at f, for rows of T read by LOAD(p, n) (eight
   floats) and dx written by STORE(p, v, n, nt); defines NAME */
#define CYNORM_BN_COLSUMS_STEP(NAME, T, LOAD, STORE)                                      \
static inline void NAME(const T* g0, const T* g1, const T* g2, const T* g3, const T* x0,  \
                        const T* x1, const T* x2, const T* x3, const float* m, double* sg, \
                        double* sgx, ptrdiff_t f, ptrdiff_t n, const float* k, T* d0,      \
                        ptrdiff_t ld, int nt) {                                           \
    cynorm_v8f a0 = LOAD(g0 + f, n), a1 = LOAD(g1 + f, n);                                \
    cynorm_v8f a2 = LOAD(g2 + f, n), a3 = LOAD(g3 + f, n);                                \
    cynorm_v8f mv = cynorm_ldf(m + f, n), kv, s, q;                                       \
    cynorm_v8f b0 = LOAD(x0 + f, n) - mv, b1 = LOAD(x1 + f, n) - mv;                      \
    cynorm_v8f b2 = LOAD(x2 + f, n) - mv, b3 = LOAD(x3 + f, n) - mv;                      \
    if (d0) {                                                                             \
        kv = cynorm_ldf(k + f, n);                                                        \
        STORE(d0 + f, kv * a0, n, nt);                                                    \
        STORE(d0 + ld + f, kv * a1, n, nt);                                               \
        STORE(d0 + 2 * ld + f, kv * a2, n, nt);                                           \
        STORE(d0 + 3 * ld + f, kv * a3, n, nt);                                           \
    }                                                                                     \
    s = (a0 + a1) + (a2 + a3);                                                            \
    q = (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3);                                        \
    cynorm_acc8(sg + f, s, n);                                                            \
    cynorm_acc8(sgx + f, q, n);                                                           \
}

/* The sweep over the F columns of four rows of T by STEP, from the rows' 32-byte boundary with
   streaming stores when nt (HEAD(d0, ld, F): where that boundary is, or -1) */
#define CYNORM_BN_COLSUMS4_BODY(STEP, T, HEAD)                                            \
    ptrdiff_t f = 0, head = 0;                                                            \
    if (nt) {                                                                             \
        head = d0 ? HEAD(d0, ld, F) : -1;                                                 \
        nt = head >= 0;                                                                   \
        head = nt ? head : 0;                                                             \
    }                                                                                     \
    {                                                                                     \
        /* the next four rows (rows are contiguous runs, so they follow: g3 + (g3 - g2)    \
           ...): ask for them one cache line ahead of use each, since these short row      \
           streams (a few KB each) restart every four rows, too short for the hardware     \
           prefetcher to catch (prefetching an address past the array never faults) */    \
        const ptrdiff_t lg = g1 - g0, lx = x1 - x0, line = 64 / (ptrdiff_t)sizeof(T);     \
        const T* gn = g3 + lg;                                                            \
        const T* xn = x3 + lx;                                                            \
        if (head > 0)                                                                     \
            STEP(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, 0, head, k, d0, ld, 0);      \
        for (f = head; f + 8 <= F; f += 8) {                                              \
            if (((f - head) & (line - 1)) == 0) {                                         \
                cynorm_prefetch(gn + f); cynorm_prefetch(gn + lg + f);                    \
                cynorm_prefetch(gn + 2 * lg + f); cynorm_prefetch(gn + 3 * lg + f);       \
                cynorm_prefetch(xn + f); cynorm_prefetch(xn + lx + f);                    \
                cynorm_prefetch(xn + 2 * lx + f); cynorm_prefetch(xn + 3 * lx + f);       \
            }                                                                             \
            STEP(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, f, 8, k, d0, ld, nt);        \
        }                                                                                 \
        if (f < F)                                                                        \
            STEP(g0, g1, g2, g3, x0, x1, x2, x3, m, sg, sgx, f, F - f, k, d0, ld, 0);     \
    }

CYNORM_BN_COLSUMS_STEP(cynorm_bn_colsums_step, float, cynorm_ldf, cynorm_stf)
#endif

static void cynorm_bn_colsums4_f(const float* g0, const float* g1, const float* g2,
                                 const float* g3, const float* x0, const float* x1,
                                 const float* x2, const float* x3, const float* m,
                                 double* sg, double* sgx, ptrdiff_t F,
                                 const float* k, float* d0, ptrdiff_t ld, int nt) {
#if defined(__GNUC__) || defined(__clang__)
    CYNORM_BN_COLSUMS4_BODY(cynorm_bn_colsums_step, float, cynorm_nt_head)
#else
    ptrdiff_t f;
    for (f = 0; f < F; f++) {
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

/* The column sweep and the training dx rows on 16-bit g, x and dx (float16, bfloat16), widened
 * in registers as they are read (exactly) and dx narrowed once: the same float32 operations in
 * the same order as cynorm_bn_colsums4_f and the float32 dx rows over widened copies, so their
 * bits.  Without GCC vectors, the rows are widened into scratch (12 F floats) instead. */
#if CYNORM_HALF_VECTORS
#define CYNORM_NO_NT_HEAD(p, ld, n) ((ptrdiff_t)-1)   /* 16-bit dx: plain stores */
CYNORM_BN_COLSUMS_STEP(cynorm_bn_colsums_step_f16, uint16_t, CYNORM_LDH_F16, CYNORM_STH_F16)
CYNORM_BN_COLSUMS_STEP(cynorm_bn_colsums_step_bf16, uint16_t, CYNORM_LDH_BF16,
                       CYNORM_STH_BF16)
#define CYNORM_BN_COLSUMS4_HALF(NAME, STEP)                                               \
static void NAME(const uint16_t* g0, const uint16_t* g1, const uint16_t* g2,              \
                 const uint16_t* g3, const uint16_t* x0, const uint16_t* x1,              \
                 const uint16_t* x2, const uint16_t* x3, const float* m, double* sg,      \
                 double* sgx, ptrdiff_t F, const float* k, uint16_t* d0, ptrdiff_t ld) {  \
    int nt = 0;                                                                           \
    CYNORM_BN_COLSUMS4_BODY(STEP, uint16_t, CYNORM_NO_NT_HEAD)                            \
}
CYNORM_BN_COLSUMS4_HALF(cynorm_bn_colsums4_f16, cynorm_bn_colsums_step_f16)
CYNORM_BN_COLSUMS4_HALF(cynorm_bn_colsums4_bf16, cynorm_bn_colsums_step_bf16)
#endif

/* cynorm_bn_colsums4_f on 16-bit rows (rows of 16-bit dx ld apart, or d0 NULL) */
static void cynorm_bn_colsums4_half(const uint16_t* const* g, const uint16_t* const* x,
                                    const float* m, double* sg, double* sgx, ptrdiff_t F,
                                    const float* k, uint16_t* d0, ptrdiff_t ld, int kind,
                                    float* scratch) {
#if CYNORM_HALF_VECTORS
    (void)scratch;
    if (kind == CYNORM_BF16)
        cynorm_bn_colsums4_bf16(g[0], g[1], g[2], g[3], x[0], x[1], x[2], x[3], m, sg, sgx, F,
                                k, d0, ld);
    else
        cynorm_bn_colsums4_f16(g[0], g[1], g[2], g[3], x[0], x[1], x[2], x[3], m, sg, sgx, F,
                               k, d0, ld);
#else
    int r;
    for (r = 0; r < 4; r++) {
        cynorm_widen_half(g[r], scratch + r * F, F, kind);
        cynorm_widen_half(x[r], scratch + (4 + r) * F, F, kind);
    }
    cynorm_bn_colsums4_f(scratch, scratch + F, scratch + 2 * F, scratch + 3 * F, scratch + 4 * F,
                         scratch + 5 * F, scratch + 6 * F, scratch + 7 * F, m, sg, sgx, F, k,
                         d0 ? scratch + 8 * F : NULL, F, 0);
    if (d0)
        for (r = 0; r < 4; r++)
            cynorm_narrow_half(scratch + (8 + r) * F, d0 + r * ld, F, kind);
#endif
}

/* The dx row of the column layout on 16-bit g, x and dx: dx = k1·g + (k2·(x - mh) + k3) per
 * column (training), k1·g (not), as the float32 row computes it (the same expression, so the
 * compiler fuses both alike), narrowed once. */
#if CYNORM_HALF_VECTORS
#define CYNORM_BN_DX_VEC_HALF(NAME, KIND)                                                 \
static void NAME(const uint16_t* g, const uint16_t* x, uint16_t* dx, ptrdiff_t n,         \
                 const float* mh, const float* k1, const float* k2, const float* k3,      \
                 int training) {                                                          \
    ptrdiff_t j, e;                                                                       \
    cynorm_v8f r;                                                                         \
    for (j = 0; j < n; j += 8) {                                                          \
        e = n - j < 8 ? n - j : 8;                                                        \
        r = training ? CYNORM_MULADD8(cynorm_ldf(k1 + j, e), cynorm_ldh(g + j, e, KIND),  \
                                      CYNORM_MULADD8(cynorm_ldf(k2 + j, e),               \
                                                     cynorm_ldh(x + j, e, KIND)           \
                                                         - cynorm_ldf(mh + j, e),         \
                                                     cynorm_ldf(k3 + j, e)))              \
                     : cynorm_ldf(k1 + j, e) * cynorm_ldh(g + j, e, KIND);                \
        cynorm_sth(dx + j, r, e, KIND);                                                   \
    }                                                                                     \
}
CYNORM_BN_DX_VEC_HALF(cynorm_bn_dx_vec_f16, CYNORM_F16)
CYNORM_BN_DX_VEC_HALF(cynorm_bn_dx_vec_bf16, CYNORM_BF16)
#endif

static void cynorm_bn_dx_vec_half(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                                  ptrdiff_t n, const float* mh, const float* k1,
                                  const float* k2, const float* k3, int training, int kind) {
#if CYNORM_HALF_VECTORS
    if (kind == CYNORM_BF16)
        cynorm_bn_dx_vec_bf16(g, x, dx, n, mh, k1, k2, k3, training);
    else
        cynorm_bn_dx_vec_f16(g, x, dx, n, mh, k1, k2, k3, training);
#else
    float gs[256], xs[256];
    ptrdiff_t j, e, l;
    for (j = 0; j < n; j += 256) {
        e = n - j < 256 ? n - j : 256;
        cynorm_widen_half(g + j, gs, e, kind);
        cynorm_widen_half(x + j, xs, e, kind);
        for (l = 0; l < e; l++)
            gs[l] = training ? k1[j + l] * gs[l] + (k2[j + l] * (xs[l] - mh[j + l])
                                                    + k3[j + l])
                             : k1[j + l] * gs[l];
        cynorm_narrow_half(gs, dx + j, e, kind);
    }
#endif
}

#endif /* CYNORM_OPS_BATCH_NORM_H */
