/* cynorm core: LayerNorm's / RMSNorm's row written in 16 bits (core/halves.pxi's output),
 * computed from the row's float32 copy or straight from its 16-bit elements, widened in
 * registers as they are read (the same float32 values, so the same bits, without the copy).
 */
#ifndef CYNORM_CORE_HALVES_ROWS_H
#define CYNORM_CORE_HALVES_ROWS_H

#include "halves.h"

/* y = (x - mean) * rstd * w + b (w, b: NULL for none), narrowed once, with plain stores or
 * (stream) streamed in the row's whole lines.
 *
 * In float32 as the float rows compute it, ((x - mh) - ml) * (rs * w) + b, except where the
 * bias cancels most of the product.  The float32 terms carry errors of a few 2^-24 of
 * |(x - mean) * rstd * w| <= |y| + |b|; while |y| >= 2^-9 |b| that is below 2^-13 |y|, a
 * quarter of a float16 ulp (2^-11 |y| or more; bfloat16's is larger), so the narrowed result
 * is the correctly rounded one or its neighbour.  A lane below that bound (or NaN) is
 * computed again in float64 (m, mlo, rsd: the mean and rstd as float64), where the terms'
 * errors are 2^-53 of them: that lane alone, so that an element's value never depends on
 * which block (16, 8 or 1 wide: the output's place in its line) it fell in.  xj is element
 * j's value as a float. */
#if defined(__FMA__) && defined(__OPTIMIZE__)
#define CYNORM_MULADD1(a, b, c) fmaf(a, b, c)   /* the scalar CYNORM_MULADD8 (core/halves.h) */
#define CYNORM_MULADD1D(a, b, c) fma(a, b, c)
#else
#define CYNORM_MULADD1(a, b, c) ((a) * (b) + (c))
#define CYNORM_MULADD1D(a, b, c) ((a) * (b) + (c))
#endif
#define CYNORM_HALF_ELEM(xj, j)                                                           \
    (b ? CYNORM_MULADD1(((xj) - mh) - ml, w ? rs * w[j] : rs, b[j])                         \
       : (((xj) - mh) - ml) * (w ? rs * w[j] : rs))
#define CYNORM_HALF_D(xj) (((double)(xj) - m) - mlo)
#define CYNORM_HALF_ELEM64(xj, j)                                                         \
    ((float)(b ? CYNORM_MULADD1D(CYNORM_HALF_D(xj) * rsd, w ? (double)w[j] : 1.0, (double)b[j]) \
               : CYNORM_HALF_D(xj) * rsd * (w ? (double)w[j] : 1.0)))

static inline float cynorm_half_elem(float xj, const float* w, const float* b, float mh,
                                     float ml, float rs, double m, double mlo, double rsd,
                                     ptrdiff_t j) {
    float v = CYNORM_HALF_ELEM(xj, j);
    if (b && !(fabsf(v) >= CYNORM_HALF_CANCEL * fabsf(b[j])))
        v = CYNORM_HALF_ELEM64(xj, j);
    return v;
}

#if CYNORM_HALF_VECTORS
typedef int32_t cynorm_v8i __attribute__((vector_size(32)));

/* eight elements xv, their w and b at w, b */
static inline cynorm_v8f cynorm_half_block(cynorm_v8f xv, const float* w, const float* b,
                                           float mh, float ml, float rs, double m,
                                           double mlo, double rsd) {
    cynorm_v8f wv, bv, r;
    cynorm_v8i ok, mag = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                          0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    int all = 1;
    cynorm_v8f d = (xv - mh) - ml, s = rs + (cynorm_v8f){0, 0, 0, 0, 0, 0, 0, 0};
    if (w) {
        memcpy(&wv, w, sizeof wv);
        s = rs * wv;
    }
    if (!b)
        return d * s;
    memcpy(&bv, b, sizeof bv);
    r = CYNORM_MULADD8(d, s, bv);
    ok = (cynorm_v8f)((cynorm_v8i)r & mag) >= CYNORM_HALF_CANCEL * (cynorm_v8f)((cynorm_v8i)bv & mag);
#if defined(__AVX__)
    all = _mm256_movemask_ps((__m256)ok) == 0xff;
#else
    for (int k = 0; k < 8; k++)
        all &= ok[k] != 0;
#endif
    if (!all)   /* rare: the bias cancels the product (or NaN); those lanes only */
        for (int k = 0; k < 8; k++)
            if (!ok[k])
                r[k] = CYNORM_HALF_ELEM64(xv[k], k);
    return r;
}

/* eight floats at p, or eight 16-bit elements at p widened (h16) */
static inline __attribute__((always_inline)) cynorm_v8f cynorm_row_ld8(const void* p,
                                                                      int h16, int kind) {
    cynorm_v8f v;
    if (h16) {
        cynorm_v8h h;
        memcpy(&h, p, sizeof h);
        return cynorm_unpack8(h, kind);
    }
    memcpy(&v, p, sizeof v);
    return v;
}
#endif

#if CYNORM_HALF16
/* sixteen elements xv, their w and b at w, b, narrowed (kind's).  With a bias the lanes that
 * pass the bound are finite or infinite, never NaN: bfloat16 narrows them without its NaN
 * step (cynorm_pack16_bf_num); a block with a lane redone narrows in full. */
static inline __m256i cynorm_half_out16(__m512 xv, const float* w, const float* b, float mh,
                                        float ml, float rs, double m, double mlo, double rsd,
                                        int kind) {
    const __m512 d = _mm512_sub_ps(_mm512_sub_ps(xv, _mm512_set1_ps(mh)), _mm512_set1_ps(ml));
    const __m512 s = w ? _mm512_mul_ps(_mm512_set1_ps(rs), _mm512_loadu_ps(w))
                       : _mm512_set1_ps(rs);
    __m512 r, bv;
    __mmask16 ok;
    if (!b)
        return cynorm_pack16(_mm512_mul_ps(d, s), kind);
    bv = _mm512_loadu_ps(b);
    r = CYNORM_MULADD16(d, s, bv);
    ok = _mm512_cmp_ps_mask(_mm512_abs_ps(r),
                            _mm512_mul_ps(_mm512_set1_ps(CYNORM_HALF_CANCEL), _mm512_abs_ps(bv)),
                            _CMP_GE_OQ);
    if (ok != 0xffff) {
        float t[16], x[16];   /* rare: the bias cancels the product (or NaN); those lanes only */
        _mm512_storeu_ps(x, xv);
        _mm512_storeu_ps(t, r);
        for (int k = 0; k < 16; k++)
            if (!((ok >> k) & 1))
                t[k] = CYNORM_HALF_ELEM64(x[k], k);
        return cynorm_pack16(_mm512_loadu_ps(t), kind);
    }
    return kind == CYNORM_BF16 ? cynorm_pack16_bf_num(r) : cynorm_pack16(r, kind);
}

/* sixteen floats at p, or sixteen 16-bit elements at p widened (h16) */
static inline __attribute__((always_inline)) __m512 cynorm_row_ld16(const void* p, int h16,
                                                                   int kind) {
    if (!h16)
        return _mm512_loadu_ps(p);
    {
        const __m256i h = _mm256_loadu_si256((const __m256i*)p);
        return kind == CYNORM_BF16
            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            : _mm512_cvtph_ps(h);
    }
}
#endif

/* element j of xp (floats, or 16-bit elements widened: h16) as a float */
static inline __attribute__((always_inline)) float cynorm_row_ld1(const void* xp, ptrdiff_t j,
                                                                 int h16, int kind) {
    return h16 ? cynorm_half2f(((const uint16_t*)xp)[j], kind) : ((const float*)xp)[j];
}

/* The row's output from xp: n floats (h16 0) or n 16-bit elements of that kind (h16 1);
 * inlined into the two functions below with h16 a constant. */
static inline __attribute__((always_inline)) void cynorm_apply_row_half(
        const void* xp, int h16, uint16_t* y, ptrdiff_t n, float mh, float ml, float rs,
        double m, double mlo, double rsd, const float* w, const float* b, int kind,
        int stream) {
    const size_t es = h16 ? sizeof(uint16_t) : sizeof(float);
    const char* x = (const char*)xp;
    ptrdiff_t j = 0;
#if CYNORM_HALF_VECTORS
#if CYNORM_STREAMING
    if (stream) {
        cynorm_nth hv;
#define CYNORM_HB(k) cynorm_pack8(cynorm_half_block(cynorm_row_ld8(x + (j + (k)) * es, h16,   \
                                                                   kind),                 \
                                                    w ? w + j + (k) : NULL,               \
                                                    b ? b + j + (k) : NULL, mh, ml, rs, m, \
                                                    mlo, rsd), kind)
        /* one vector of CYNORM_NT_BYTES built in registers from 8-element blocks (through
           memory it stalls on store forwarding at every streamed store) */
#if CYNORM_NT_BYTES == 64 && CYNORM_HALF16
#define CYNORM_HB16(k) cynorm_half_out16(cynorm_row_ld16(x + (j + (k)) * es, h16, kind),     \
                                         w ? w + j + (k) : NULL, b ? b + j + (k) : NULL,  \
                                         mh, ml, rs, m, mlo, rsd, kind)
#define CYNORM_HALF_NT_VEC()                                                              \
        hv = (cynorm_nth)_mm512_inserti64x4(_mm512_castsi256_si512(CYNORM_HB16(0)),       \
                                            CYNORM_HB16(16), 1)
#elif CYNORM_NT_BYTES == 64
#define CYNORM_HALF_NT_VEC()                                                              \
        hv = (cynorm_nth)_mm512_inserti64x4(                                              \
            _mm512_castsi256_si512(_mm256_set_m128i((__m128i)CYNORM_HB(8), (__m128i)CYNORM_HB(0))), \
            _mm256_set_m128i((__m128i)CYNORM_HB(24), (__m128i)CYNORM_HB(16)), 1)
#elif CYNORM_NT_BYTES == 32
#define CYNORM_HALF_NT_VEC()                                                              \
        hv = (cynorm_nth)_mm256_set_m128i((__m128i)CYNORM_HB(8), (__m128i)CYNORM_HB(0))
#else
#define CYNORM_HALF_NT_VEC() hv = (cynorm_nth)CYNORM_HB(0)
#endif
        CYNORM_NT_ROW(uint16_t, y, n,
            y[j] = cynorm_f2half(cynorm_half_elem(cynorm_row_ld1(xp, j, h16, kind), w, b, mh,
                                                  ml, rs, m, mlo, rsd, j), kind),
            CYNORM_HALF_NT_VEC();
            CYNORM_STREAM_H(y + j, hv));
#undef CYNORM_HALF_NT_VEC
#undef CYNORM_HB
#undef CYNORM_HB16
        return;
    }
#endif
#if CYNORM_HALF16
    for (; j + 16 <= n; j += 16) {
        __m256i o = cynorm_half_out16(cynorm_row_ld16(x + j * es, h16, kind), w ? w + j : NULL,
                                      b ? b + j : NULL, mh, ml, rs, m, mlo, rsd, kind);
        __asm__("" : "+v"(o));   /* as cynorm_store8h */
        _mm256_storeu_si256((__m256i*)(y + j), o);
    }
#endif
    for (; j + 8 <= n; j += 8)
        cynorm_narrow8(cynorm_half_block(cynorm_row_ld8(x + j * es, h16, kind),
                                         w ? w + j : NULL, b ? b + j : NULL, mh, ml, rs, m,
                                         mlo, rsd), y + j, kind);
#endif
    (void)stream;
    (void)es;
    (void)x;
    for (; j < n; j++)
        y[j] = cynorm_f2half(cynorm_half_elem(cynorm_row_ld1(xp, j, h16, kind), w, b, mh, ml,
                                              rs, m, mlo, rsd, j), kind);
}

/* the output from the row's float32 copy x */
static void cynorm_apply_half(const float* x, uint16_t* y, ptrdiff_t n, float mh, float ml,
                              float rs, double m, double mlo, double rsd, const float* w,
                              const float* b, int kind, int stream) {
    cynorm_apply_row_half(x, 0, y, n, mh, ml, rs, m, mlo, rsd, w, b, kind, stream);
}

/* the output from the 16-bit row x itself (kind's), widened in registers: the same bits */
static void cynorm_apply_half16(const uint16_t* x, uint16_t* y, ptrdiff_t n, float mh,
                                float ml, float rs, double m, double mlo, double rsd,
                                const float* w, const float* b, int kind, int stream) {
    if (kind == CYNORM_BF16)
        cynorm_apply_row_half(x, 1, y, n, mh, ml, rs, m, mlo, rsd, w, b, CYNORM_BF16, stream);
    else
        cynorm_apply_row_half(x, 1, y, n, mh, ml, rs, m, mlo, rsd, w, b, CYNORM_F16, stream);
}

#endif /* CYNORM_CORE_HALVES_ROWS_H */
