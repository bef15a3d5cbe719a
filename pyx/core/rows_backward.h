/* The row normalizer's backward (LayerNorm, RMSNorm with mean 0 and af 0), its float32 vector
 * loops: the row sums, dx of one row, and the parameter
 * gradients of four rows at a time (with their dx in the same sweep).
 */
#ifndef CYNORM_CORE_ROWS_BACKWARD_H
#define CYNORM_CORE_ROWS_BACKWARD_H

#include "simd.h"

/* LayerNorm backward sums of one float32 row, with g' = g w (w may be NULL) and
 * d = (x - mh) - ml (the row mean split in two floats, as dx uses it):
 *   sg = Σ g',   sgx = Σ g' d
 * g' and g' d in float32, two of each added in float32 before each float64 addition: two
 * conversions per sixteen elements instead of six (the error is float32 rounding of single
 * terms, not growing with the row). */
#if defined(__GNUC__) || defined(__clang__)
/* The body of cynorm_ln_gx_sums_f for rows of any element type: LOAD8(v, p) sets v to the
   eight floats at p, ELEM(p, i) is element i as a float (rows of 16-bit floats widened
   exactly: the float32 row's arithmetic on them, so its bits) */
#if CYNORM_AVX2_BUILD
#define CYNORM_LN_GX_ACC                                                                  \
    {                                                                                     \
        cynorm_v8f ab = a + b, ce = a * c + b * e;                                        \
        s1lo += cynorm_widen_lo(ab);                                                      \
        s1hi += cynorm_widen_hi(ab);                                                      \
        s2lo += cynorm_widen_lo(ce);                                                      \
        s2hi += cynorm_widen_hi(ce);                                                      \
    }
#define CYNORM_LN_GX_DECL cynorm_v4d s1lo = {0, 0, 0, 0}, s1hi = s1lo, s2lo = s1lo, s2hi = s1lo;
#define CYNORM_LN_GX_TOTAL                                                                \
    t1 = cynorm_hsum_halves(s1lo, s1hi);                                                  \
    t2 = cynorm_hsum_halves(s2lo, s2hi);
#else
#define CYNORM_LN_GX_ACC                                                                  \
    s1 += cynorm_widen(a + b);                                                            \
    s2 += cynorm_widen(a * c + b * e);
#define CYNORM_LN_GX_DECL cynorm_v8d zd = {0, 0, 0, 0, 0, 0, 0, 0}, s1 = zd, s2 = zd;
#define CYNORM_LN_GX_TOTAL                                                                \
    t1 = cynorm_hsum(s1);                                                                 \
    t2 = cynorm_hsum(s2);
#endif
#define CYNORM_LN_GX_SUMS_BODY(LOAD8, ELEM)                                               \
    ptrdiff_t i = 0;                                                                      \
    double t1 = 0.0, t2 = 0.0;                                                            \
    float gw, d;                                                                          \
    cynorm_v8f z = {0, 0, 0, 0, 0, 0, 0, 0};                                              \
    cynorm_v8f vh = z + mh, vl = z + ml, a, b, c, e, u, v;                                \
    CYNORM_LN_GX_DECL                                                                     \
    for (; i + 16 <= n; i += 16) {                                                        \
        if (ahead_g) {  /* a later row of g and x, a line at a time (0: none) */          \
            cynorm_prefetch(g + i + ahead_g);                                             \
            cynorm_prefetch(x + i + ahead_x);                                             \
        }                                                                                 \
        LOAD8(a, g + i); LOAD8(b, g + i + 8);                                             \
        if (w) {                                                                          \
            memcpy(&u, w + i, 32); memcpy(&v, w + i + 8, 32);                             \
            a *= u;                                                                       \
            b *= v;                                                                       \
        }                                                                                 \
        LOAD8(c, x + i); LOAD8(e, x + i + 8);                                             \
        c = (c - vh) - vl;                                                                \
        e = (e - vh) - vl;                                                                \
        CYNORM_LN_GX_ACC                                                                  \
    }                                                                                     \
    CYNORM_LN_GX_TOTAL                                                                    \
    for (; i < n; i++) {                                                                  \
        gw = w ? ELEM(g, i) * w[i] : ELEM(g, i);                                          \
        d = (ELEM(x, i) - mh) - ml;                                                       \
        t1 += (double)gw;                                                                 \
        t2 += (double)(gw * d);                                                           \
    }                                                                                     \
    *sg = t1;                                                                             \
    *sgx = t2;
#define CYNORM_LOAD8_F(v, p) memcpy(&(v), (p), 32)
#define CYNORM_ELEM_F(p, i) ((p)[i])
#endif

static void cynorm_ln_gx_sums_f(const float* g, const float* w, const float* x, ptrdiff_t n,
                                float mh, float ml, double* sg, double* sgx, ptrdiff_t ahead_g,
                                ptrdiff_t ahead_x) {
#if defined(__GNUC__) || defined(__clang__)
    CYNORM_LN_GX_SUMS_BODY(CYNORM_LOAD8_F, CYNORM_ELEM_F)
#else
    ptrdiff_t i;
    double t1 = 0.0, t2 = 0.0;
    float gw, d;
    (void)ahead_g;
    (void)ahead_x;
    for (i = 0; i < n; i++) {
        gw = w ? g[i] * w[i] : g[i];
        d = (x[i] - mh) - ml;
        t1 += (double)gw;
        t2 += (double)(gw * d);
    }
    *sg = t1;
    *sgx = t2;
#endif
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

/* One step of cynorm_ln_paramgrads4_f for rows of T, NAME: the n (1 to 8) elements at j (dr[0]
   NULL: no dx), read by LOAD(p, n) as eight floats and dx written by STORE(p, v, n, nt) */
#define CYNORM_LN_PG_STEP(NAME, T, LOAD, STORE)                                           \
static inline void NAME(const T* const* gr, const T* const* xr, ptrdiff_t j, ptrdiff_t n, \
                        const float* h, const float* l, const float* r, const float* p,   \
                        const float* q, const float* w, T* const* dr, double* dw,         \
                        double* db, int nt) {                                             \
    cynorm_v8f a[4], b[4], s, wv = {0, 0, 0, 0, 0, 0, 0, 0};                              \
    int k;                                                                                \
    for (k = 0; k < 4; k++) {                                                             \
        a[k] = LOAD(gr[k] + j, n);                                                        \
        b[k] = LOAD(xr[k] + j, n);                                                        \
        b[k] = (b[k] - h[k]) - l[k];                                                      \
    }                                                                                     \
    if (dr[0]) {                                                                          \
        if (w)                                                                            \
            wv = cynorm_ldf(w + j, n);                                                    \
        for (k = 0; k < 4; k++)                                                           \
            STORE(dr[k] + j, cynorm_ln_dx8(a[k], b[k], w, wv, r[k], p[k], q[k]), n, nt);  \
    }                                                                                     \
    if (dw) {                                                                             \
        s = (a[0] * (b[0] * r[0]) + a[1] * (b[1] * r[1]))                                 \
            + (a[2] * (b[2] * r[2]) + a[3] * (b[3] * r[3]));                              \
        cynorm_acc8(dw + j, s, n);                                                        \
    }                                                                                     \
    if (db) {                                                                             \
        s = (a[0] + a[1]) + (a[2] + a[3]);                                                \
        cynorm_acc8(db + j, s, n);                                                        \
    }                                                                                     \
}
CYNORM_LN_PG_STEP(cynorm_ln_pg_step, float, cynorm_ldf, cynorm_stf)

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

#if defined(__GNUC__) || defined(__clang__)
/* the sweep of cynorm_ln_paramgrads4_f by STEP: the columns before head (masked), whole vectors
   from head (streamed when nt), the last few (masked) */
#define CYNORM_LN_PG_SWEEP(STEP)                                                          \
    if (head > 0)                                                                         \
        STEP(gr, xr, 0, head, h, l, r, p, q, w, dr, dw, db, 0);                           \
    for (j = head; j + 8 <= D; j += 8)                                                    \
        STEP(gr, xr, j, 8, h, l, r, p, q, w, dr, dw, db, nt);                             \
    if (j < D)                                                                            \
        STEP(gr, xr, j, D - j, h, l, r, p, q, w, dr, dw, db, 0);
#endif

/* cynorm_ln_paramgrads4_f's locals, rows of T: the row pointers and per-row scalars copied
   (stores to dx, dw and db could alias the arrays they came from, which would make the
   compiler reload them every step) */
#define CYNORM_LN_PG_LOCALS(T)                                                            \
    ptrdiff_t j = 0, head = 0;                                                            \
    int k;                                                                                \
    const T* gr[4] = {g[0], g[1], g[2], g[3]};                                            \
    const T* xr[4] = {x[0], x[1], x[2], x[3]};                                            \
    T* dr[4] = {NULL, NULL, NULL, NULL};                                                  \
    float h[4] = {mh[0], mh[1], mh[2], mh[3]}, l[4] = {ml[0], ml[1], ml[2], ml[3]};       \
    float r[4] = {rs[0], rs[1], rs[2], rs[3]}, p[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};  \
    if (dx)                                                                               \
        for (k = 0; k < 4; k++) {                                                         \
            dr[k] = dx[k];                                                                \
            p[k] = af[k];                                                                 \
            q[k] = cf[k];                                                                 \
        }

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
    CYNORM_LN_PG_LOCALS(float)
#if CYNORM_AVX2_BUILD || CYNORM_SSE2_BUILD
    /* Plain stores below AVX-512: streamed, this sweep took several times as long on a Zen 3
       with AVX2, and neither filling each line with two stores in a row nor streaming row
       after row helped where the rows are 4 KiB apart (benchmarks/RESULTS.md, items 55 and
       63). */
    nt = 0;
#endif
    if (nt) {
        head = dx ? cynorm_nt_head(dr[0], dr[1] - dr[0], D) : -1;
        nt = head >= 0;
        head = nt ? head : 0;
    }
#if CYNORM_SSE2_BUILD
    /* four columns at a time (eight-float steps made each per-row scalar into a vector
       through the stack, every step, several times slower: benchmarks/RESULTS.md, item 61),
       then the scalar loop below for the last few */
    for (j = 0; j + 4 <= D; j += 4)
        cynorm_ln_pg_step4(gr, xr, j, h, l, r, p, q, w, dr, dw, db);
#elif defined(__GNUC__) || defined(__clang__)
    CYNORM_LN_PG_SWEEP(cynorm_ln_pg_step)
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


#endif /* CYNORM_CORE_ROWS_BACKWARD_H */
