/* cynorm core: core/sums.h's reductions and the backward's dx row on 16-bit floats (float16,
 * bfloat16), widened in registers as they are read (core/halves.h's conversions): the column
 * sweep's centred sums of four rows, the moments' shifted sums and the backward's gx sums of a
 * row (core/sums.h's loops instantiated on 16-bit elements: the float32 copy's bits), and
 * BatchNorm's / the group norms' dx row written in 16 bits.
 */
#ifndef CYNORM_CORE_HALVES_SUMS_H
#define CYNORM_CORE_HALVES_SUMS_H

#include "halves.h"
#include "sums.h"
#include "rows_backward.h"

/* core/sums.h's centred sums of four rows on 16-bit rows (the float64 column sweep), nr
 * rows (a multiple of four) in turn:
 *   c[f] += Σ_k (r_k[f] - shift[f]),   q[f] += Σ_k (r_k[f] - shift[f])²
 * in float64, in cynorm_centered4_f's order, four rows at a time.  The AVX-512 build widens
 * in registers, sixteen columns of each four rows at a time (the last ones under a mask), and
 * keeps a column's c and q in registers across up to four groups of four (the same additions
 * in the same order as one call per group, so the same bits, with a quarter of the stores and
 * reloads; sixteen rows of a wide block still fit in L1 as the columns are swept); the others
 * widen each group into scratch (4 * F floats) and call cynorm_centered4_f. */
static inline void cynorm_centered_half(const uint16_t* const* rows, ptrdiff_t nr,
                                        const double* shift, double* c, double* q,
                                        ptrdiff_t F, int kind, float* scratch) {
#if CYNORM_HALF16
    ptrdiff_t f, g, g0, g1;
    int r, h;
    const __m512d one = _mm512_set1_pd(1.0);
    for (g0 = 0; g0 + 4 <= nr; g0 = g1) {
        g1 = nr - g0 >= 16 ? g0 + 16 : nr - (nr - g0) % 4;
        for (f = 0; f < F; f += 16) {
            const __mmask16 m = F - f >= 16 ? (__mmask16)0xffff
                                            : (__mmask16)((1u << (unsigned)(F - f)) - 1u);
            const __mmask8 mk[2] = {(__mmask8)(m & 0xff), (__mmask8)(m >> 8)};
            __m512d sh[2], cs[2], qs[2];
            for (h = 0; h < 2; h++) {   /* columns f..f+7, then f+8..f+15, in float64 */
                sh[h] = _mm512_maskz_loadu_pd(mk[h], shift + f + 8 * h);
                cs[h] = _mm512_maskz_loadu_pd(mk[h], c + f + 8 * h);
                qs[h] = _mm512_maskz_loadu_pd(mk[h], q + f + 8 * h);
            }
            for (g = g0; g < g1; g += 4) {
                for (h = 0; h < 2; h++) {   /* eight columns widened to float32 in a ymm */
                    __m512d d[4];
                    for (r = 0; r < 4; r++) {
                        const __m128i x = _mm_maskz_loadu_epi16(mk[h], rows[g + r] + f + 8 * h);
                        const __m256 part = kind == CYNORM_BF16
                            ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x),
                                                                    16))
                            : _mm256_cvtph_ps(x);
                        /* x - shift as an fmsub (the same rounding): on Zen 4 the FMA pipes
                           have room, the adds' do not */
                        d[r] = _mm512_fmsub_pd(_mm512_cvtps_pd(part), one, sh[h]);
                    }
                    cs[h] = _mm512_add_pd(cs[h], _mm512_add_pd(_mm512_add_pd(d[0], d[1]),
                                                               _mm512_add_pd(d[2], d[3])));
                    qs[h] = _mm512_add_pd(
                        qs[h],
                        _mm512_add_pd(_mm512_fmadd_pd(d[0], d[0], _mm512_mul_pd(d[1], d[1])),
                                      _mm512_fmadd_pd(d[2], d[2], _mm512_mul_pd(d[3], d[3]))));
                }
            }
            for (h = 0; h < 2; h++) {
                _mm512_mask_storeu_pd(c + f + 8 * h, mk[h], cs[h]);
                _mm512_mask_storeu_pd(q + f + 8 * h, mk[h], qs[h]);
            }
        }
    }
    (void)scratch;
#else
    ptrdiff_t g;
    int r;
    for (g = 0; g + 4 <= nr; g += 4) {
        for (r = 0; r < 4; r++)
            cynorm_widen_half(rows[g + r], scratch + r * F, F, kind);
        cynorm_centered4_f(scratch, scratch + F, scratch + 2 * F, scratch + 3 * F, shift, c,
                           q, 0, F);
    }
#endif
}

/* core/sums.h's two-sum loops on 16-bit elements, one function per kind: the moments' shifted
 * sums and the backward's gx sums (g and x 16-bit, w NULL), the same partial sums in the same
 * order, each element widened exactly on its way in, so the bits of cynorm_shifted_sums_f and
 * cynorm_gx_sums_f over widened copies. */
#if defined(__GNUC__) || defined(__clang__)
#if CYNORM_AVX2_BUILD
#define CYNORM_LOAD4_F16(v, p)                                                            \
    (v) = (cynorm_v4d)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(p))))
#define CYNORM_LOAD4_BF16(v, p)                                                           \
    (v) = (cynorm_v4d)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(                    \
        _mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)(p))), 16)))
#define CYNORM_HALF_LOAD_F16 CYNORM_LOAD4_F16
#define CYNORM_HALF_LOAD_BF16 CYNORM_LOAD4_BF16
#else
#if defined(__F16C__)
#define CYNORM_LOAD8_F16(v, p)                                                            \
    (v) = cynorm_widen((cynorm_v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))))
#else
#define CYNORM_LOAD8_F16(v, p)                                                            \
    do {                                                                                  \
        cynorm_v8f f_;                                                                    \
        int l_;                                                                           \
        for (l_ = 0; l_ < 8; l_++)                                                        \
            f_[l_] = cynorm_h2f((p)[l_]);                                                 \
        (v) = cynorm_widen(f_);                                                           \
    } while (0)
#endif
#if defined(__AVX2__)
#define CYNORM_LOAD8_BF16(v, p)                                                           \
    (v) = cynorm_widen((cynorm_v8f)_mm256_castsi256_ps(_mm256_slli_epi32(                 \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p))), 16)))
#else
#define CYNORM_LOAD8_BF16(v, p)                                                           \
    do {                                                                                  \
        cynorm_v8h h_;                                                                    \
        cynorm_v8u u_;                                                                    \
        memcpy(&h_, (p), sizeof h_);                                                      \
        u_ = __builtin_convertvector(h_, cynorm_v8u) << 16;                               \
        (v) = cynorm_widen((cynorm_v8f)u_);                                               \
    } while (0)
#endif
#define CYNORM_HALF_LOAD_F16 CYNORM_LOAD8_F16
#define CYNORM_HALF_LOAD_BF16 CYNORM_LOAD8_BF16
#endif
#else
#define CYNORM_HALF_LOAD_F16
#define CYNORM_HALF_LOAD_BF16
#endif
#undef CYNORM_SCALAR
#define CYNORM_SCALAR(v) ((double)cynorm_h2f(v))
CYNORM_TWO_SUMS(cynorm_gx_sums_f16, uint16_t, CYNORM_HALF_LOAD_F16, CYNORM_G, CYNORM_GD)
CYNORM_TWO_SUMS(cynorm_shifted_sums_f16, uint16_t, CYNORM_HALF_LOAD_F16, CYNORM_D, CYNORM_DD)
#undef CYNORM_SCALAR
#define CYNORM_SCALAR(v) ((double)cynorm_bf2f(v))
CYNORM_TWO_SUMS(cynorm_gx_sums_bf16, uint16_t, CYNORM_HALF_LOAD_BF16, CYNORM_G, CYNORM_GD)
CYNORM_TWO_SUMS(cynorm_shifted_sums_bf16, uint16_t, CYNORM_HALF_LOAD_BF16, CYNORM_D,
                CYNORM_DD)
#undef CYNORM_SCALAR
#define CYNORM_SCALAR(v) ((double)(v))

/* the moments' shifted sums of a 16-bit row (block_moments' on its widened copy, to the bit) */
static inline void cynorm_shifted_sums_half(const uint16_t* x, ptrdiff_t n, double shift,
                                            double* s1, double* s2, int kind) {
    if (kind == CYNORM_BF16)
        cynorm_shifted_sums_bf16(NULL, NULL, x, n, shift, s1, s2);
    else
        cynorm_shifted_sums_f16(NULL, NULL, x, n, shift, s1, s2);
}

static inline void cynorm_gx_sums_half(const uint16_t* g, const uint16_t* x, ptrdiff_t n,
                                       double shift, double* s1, double* s2, int kind) {
    if (kind == CYNORM_BF16)
        cynorm_gx_sums_bf16(g, NULL, x, n, shift, s1, s2);
    else
        cynorm_gx_sums_f16(g, NULL, x, n, shift, s1, s2);
}

/* BatchNorm's / the group norms' dx row on 16-bit g, x and dx: dx = k1·g + (k2·(x - mh) +
 * k3) (training), k1·g (not), in float32 as the float32 row computes it, narrowed once.  The
 * AVX-512 build widens in registers, sixteen at a time; the others widen pieces of the row
 * into a stack scratch. */
static inline void cynorm_bn_dx_half(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                                     ptrdiff_t n, float mh, float k1, float k2, float k3,
                                     int training, int kind) {
    ptrdiff_t j = 0, a, e, l;
#if CYNORM_HALF16
    const __m512 vm = _mm512_set1_ps(mh), v1 = _mm512_set1_ps(k1);
    const __m512 v2 = _mm512_set1_ps(k2), v3 = _mm512_set1_ps(k3);
    for (; j + 16 <= n; j += 16) {
        const __m256i hg = _mm256_loadu_si256((const __m256i*)(g + j));
        const __m256i hx = _mm256_loadu_si256((const __m256i*)(x + j));
        const __m512 gv = kind == CYNORM_BF16
            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hg), 16))
            : _mm512_cvtph_ps(hg);
        __m512 r;
        if (training) {
            const __m512 xv = kind == CYNORM_BF16
                ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hx), 16))
                : _mm512_cvtph_ps(hx);
            /* the float32 row's expression as written, not fmadd intrinsics: the compiler
               then fuses (or, at -O0, does not fuse) both alike */
            r = v1 * gv + (v2 * (xv - vm) + v3);
        } else {
            r = v1 * gv;
        }
        cynorm_narrow16(r, dx + j, kind);
    }
#endif
    {
        float gs[256], xs[256];
        for (a = j; a < n; a += 256) {
            e = n - a < 256 ? n - a : 256;
            cynorm_widen_half(g + a, gs, e, kind);
            cynorm_widen_half(x + a, xs, e, kind);
            if (training)
                for (l = 0; l < e; l++)
                    gs[l] = k1 * gs[l] + (k2 * (xs[l] - mh) + k3);
            else
                for (l = 0; l < e; l++)
                    gs[l] = k1 * gs[l];
            cynorm_narrow_half(gs, dx + a, e, kind);
        }
    }
}

/* The row norms' backward sweeps (core/rows_backward.h) on 16-bit g, x and dx, one function
 * per kind: a row's gx sums and four rows' dx and parameter gradients, widened in registers
 * and dx narrowed once, the float32 sweeps' operations in their order: their bits over
 * widened copies.  Not in the baseline build (its float32 sweep takes four columns at a
 * time): CYNORM_HALF_ROWS_BACKWARD 0, and the rows are widened into scratch instead. */
#if CYNORM_HALF_VECTORS && !CYNORM_SSE2_BUILD
#define CYNORM_HALF_ROWS_BACKWARD 1
#define CYNORM_LDH8_F16(v, p) (v) = cynorm_ldh(p, 8, CYNORM_F16)
#define CYNORM_LDH8_BF16(v, p) (v) = cynorm_ldh(p, 8, CYNORM_BF16)
#define CYNORM_ELEM_F16(p, i) cynorm_h2f((p)[i])
#define CYNORM_ELEM_BF16(p, i) cynorm_bf2f((p)[i])
#define CYNORM_LN_HALF(SUFFIX, LOAD8, ELEM, LOAD, STORE)                                  \
static void cynorm_ln_gx_sums_##SUFFIX(const uint16_t* g, const float* w, const uint16_t* x, \
                                       ptrdiff_t n, float mh, float ml, double* sg,       \
                                       double* sgx, ptrdiff_t ahead_g, ptrdiff_t ahead_x) { \
    CYNORM_LN_GX_SUMS_BODY(LOAD8, ELEM)                                                   \
}                                                                                         \
CYNORM_LN_PG_STEP(cynorm_ln_pg_step_##SUFFIX, uint16_t, LOAD, STORE)                      \
static void cynorm_ln_paramgrads4_##SUFFIX(const uint16_t* const* g,                      \
                                           const uint16_t* const* x, const float* mh,     \
                                           const float* ml, const float* rs, double* dw,  \
                                           double* db, ptrdiff_t D, const float* w,       \
                                           const float* af, const float* cf,              \
                                           uint16_t* const* dx) {                         \
    int nt = 0;                                                                           \
    CYNORM_LN_PG_LOCALS(uint16_t)                                                         \
    CYNORM_LN_PG_SWEEP(cynorm_ln_pg_step_##SUFFIX)                                        \
}
CYNORM_LN_HALF(f16, CYNORM_LDH8_F16, CYNORM_ELEM_F16, CYNORM_LDH_F16, CYNORM_STH_F16)
CYNORM_LN_HALF(bf16, CYNORM_LDH8_BF16, CYNORM_ELEM_BF16, CYNORM_LDH_BF16, CYNORM_STH_BF16)
#else
#define CYNORM_HALF_ROWS_BACKWARD 0
#endif

/* cynorm_ln_gx_sums_f and cynorm_ln_paramgrads4_f (with dx) on 16-bit rows (only where
 * CYNORM_HALF_ROWS_BACKWARD) */
static inline void cynorm_ln_gx_sums_half(const uint16_t* g, const float* w, const uint16_t* x,
                                          ptrdiff_t n, float mh, float ml, double* sg,
                                          double* sgx, ptrdiff_t ahead_g, ptrdiff_t ahead_x,
                                          int kind) {
#if CYNORM_HALF_ROWS_BACKWARD
    if (kind == CYNORM_BF16)
        cynorm_ln_gx_sums_bf16(g, w, x, n, mh, ml, sg, sgx, ahead_g, ahead_x);
    else
        cynorm_ln_gx_sums_f16(g, w, x, n, mh, ml, sg, sgx, ahead_g, ahead_x);
#else
    (void)g; (void)w; (void)x; (void)n; (void)mh; (void)ml; (void)ahead_g; (void)ahead_x;
    (void)kind;
    *sg = *sgx = 0.0;
#endif
}

static inline void cynorm_ln_paramgrads4_half(const uint16_t* const* g,
                                              const uint16_t* const* x, const float* mh,
                                              const float* ml, const float* rs, double* dw,
                                              double* db, ptrdiff_t D, const float* w,
                                              const float* af, const float* cf,
                                              uint16_t* const* dx, int kind) {
#if CYNORM_HALF_ROWS_BACKWARD
    if (kind == CYNORM_BF16)
        cynorm_ln_paramgrads4_bf16(g, x, mh, ml, rs, dw, db, D, w, af, cf, dx);
    else
        cynorm_ln_paramgrads4_f16(g, x, mh, ml, rs, dw, db, D, w, af, cf, dx);
#else
    (void)g; (void)x; (void)mh; (void)ml; (void)rs; (void)dw; (void)db; (void)D; (void)w;
    (void)af; (void)cf; (void)dx; (void)kind;
#endif
}

#endif /* CYNORM_CORE_HALVES_SUMS_H */
