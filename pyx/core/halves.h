/* cynorm core: 16-bit floats (IEEE float16 and bfloat16) widened to float32 and narrowed back.
 *
 * The kernels keep 16-bit data as uint16_t bit patterns; a row is widened into a float32
 * scratch row, computed there as float32 data is, and its result narrowed once on the way
 * out, rounding to nearest even.
 *
 * - float16: vcvtph2ps / vcvtps2ph, sixteen at a time in the AVX-512 build and eight with
 *   F16C in the AVX2 one (setup.py adds -mf16c, and _common.pxd's CPU check asks for it),
 *   else the portable scalar conversions below (subnormals, inf and NaN included).
 * - bfloat16: the upper half of a float32; widened by a shift, narrowed by adding the
 *   rounding bias (0x7fff plus the lowest kept bit) before the shift, NaN kept quiet: AVX-512
 *   or AVX2 integer intrinsics, else vector-extension loops and the scalar ones.
 *
 * kind 0 is float16, kind 1 bfloat16 (CYNORM_F16, CYNORM_BF16).
 */
#ifndef CYNORM_CORE_HALVES_H
#define CYNORM_CORE_HALVES_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "stores.h"

#define CYNORM_F16 0
#define CYNORM_BF16 1

#if defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif

static inline float cynorm_h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);                /* inf, NaN (payload kept) */
    } else if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f;             /* zero, subnormal: m * 2^-24 */
        memcpy(&u, &f, sizeof u);
        u |= sign;
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);         /* rebias 15 -> 127 */
    }
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t cynorm_f2h(float f) {
    uint32_t u, a, sign;
    float t;
    memcpy(&u, &f, sizeof u);
    sign = (u >> 16) & 0x8000u;
    a = u & 0x7fffffffu;
    if (a > 0x7f800000u)                                   /* NaN: quiet, top payload bits */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u)                                  /* from 65520 (rounds up): inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {                                 /* below 2^-14: subnormal or 0 */
        /* adding 0.5 leaves the value in units of 2^-24 in the low bits, rounded to nearest
           even by the float addition itself */
        memcpy(&t, &a, sizeof t);
        t += 0.5f;
        memcpy(&a, &t, sizeof a);
        return (uint16_t)(sign | (a - 0x3f000000u));
    }
    /* normal: rebias 127 -> 15 (-112 << 23), round the 13 dropped bits to nearest even (a
       carry into the exponent is the correct result) */
    a += 0xc8000fffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (a >> 13));
}

static inline float cynorm_bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t cynorm_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);              /* NaN stays NaN, quiet */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__GNUC__) || defined(__clang__)
#define CYNORM_HALF_VECTORS 1
/* a·b + c as the compiler computes the float32 rows' a*b + c: fused where it contracts (an
   optimizing build with FMA), two roundings elsewhere.  Written out, not left to contraction:
   GCC does not fuse the AVX-512 intrinsics, and where loads' branches (whole vector or masked)
   split an expression it fused one instantiation and not another (one float32 ulp apart). */
#if defined(__FMA__) && defined(__OPTIMIZE__)
#define CYNORM_MULADD8(a, b, c)                                                           \
    ((cynorm_v8f)_mm256_fmadd_ps((__m256)(a), (__m256)(b), (__m256)(c)))
#define CYNORM_MULADD16(a, b, c) _mm512_fmadd_ps(a, b, c)
#else
#define CYNORM_MULADD8(a, b, c) ((a) * (b) + (c))
#define CYNORM_MULADD16(a, b, c) _mm512_add_ps(_mm512_mul_ps(a, b), c)
#endif
typedef uint32_t cynorm_v8u __attribute__((vector_size(32)));
typedef uint16_t cynorm_v8h __attribute__((vector_size(16)));

/* eight floats narrowed to eight 16-bit values in a register, rounded to nearest even */
static inline cynorm_v8h cynorm_pack8(cynorm_v8f v, int kind) {
    if (kind == CYNORM_BF16) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        /* cynorm_pack16's steps on eight floats */
        const __m256i u = _mm256_castps_si256((__m256)v);
        __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                     _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                      _mm256_set1_epi32(1)));
        r = _mm256_mask_or_epi32(r, _mm256_cmp_ps_mask((__m256)v, (__m256)v, _CMP_UNORD_Q), u,
                                 _mm256_set1_epi32(0x400000));
        /* the high word of each lane, gathered by one word permute (vpermw) where a shift
           and vpmovdw took three micro-ops */
        return (cynorm_v8h)_mm256_castsi256_si128(_mm256_permutexvar_epi16(
            _mm256_set_epi32(0, 0, 0, 0, 0x000f000d, 0x000b0009, 0x00070005, 0x00030001), r));
#elif defined(__AVX2__)
        const __m256i u = _mm256_castps_si256((__m256)v), top = _mm256_srli_epi32(u, 16);
        __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                                     _mm256_and_si256(top, _mm256_set1_epi32(1)));
        __m256 nan = _mm256_cmp_ps((__m256)v, (__m256)v, _CMP_UNORD_Q);
        r = _mm256_castps_si256(_mm256_blendv_ps(
            _mm256_castsi256_ps(_mm256_srli_epi32(r, 16)),
            _mm256_castsi256_ps(_mm256_or_si256(top, _mm256_set1_epi32(0x40))), nan));
        /* the eight 16-bit values (all < 2^16: packus keeps them) in the low 128 bits */
        r = _mm256_packus_epi32(r, r);
        return (cynorm_v8h)_mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
#else
        cynorm_v8u u, r, q, m;
        memcpy(&u, &v, sizeof u);
        r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        q = (u >> 16) | 0x40u;                          /* NaN: quiet */
        m = (cynorm_v8u)((u & 0x7fffffffu) > 0x7f800000u);
        return __builtin_convertvector((r & ~m) | (q & m), cynorm_v8h);
#endif
    }
#if defined(__F16C__)
    return (cynorm_v8h)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    {
        cynorm_v8h o;
        for (int k = 0; k < 8; k++)
            o[k] = cynorm_f2h(v[k]);
        return o;
    }
#endif
}

/* eight 16-bit values stored from a register (GCC would fold the store into vcvtps2ph's
   memory form, where a profile on a Zen 4 put most of the output row's time: RESULTS item 83) */
static inline void cynorm_store8h(uint16_t* d, cynorm_v8h o) {
#if defined(__SSE2__)
    __asm__("" : "+x"(o));
    _mm_storeu_si128((__m128i*)d, (__m128i)o);
#else
    memcpy(d, &o, sizeof o);
#endif
}

static inline void cynorm_narrow8(cynorm_v8f v, uint16_t* d, int kind) {
    cynorm_store8h(d, cynorm_pack8(v, kind));
}

/* eight 16-bit values widened in a register (exactly) */
static inline cynorm_v8f cynorm_unpack8(cynorm_v8h h, int kind) {
    if (kind == CYNORM_BF16)
#if defined(__AVX2__)
        return (cynorm_v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
        return (cynorm_v8f)(__builtin_convertvector(h, cynorm_v8u) << 16);
#endif
#if defined(__F16C__)
    return (cynorm_v8f)_mm256_cvtph_ps((__m128i)h);
#else
    {
        cynorm_v8f v;
        for (int k = 0; k < 8; k++)
            v[k] = cynorm_h2f(h[k]);
        return v;
    }
#endif
}

/* cynorm_ldf and cynorm_stf on 16-bit elements: the first n (1 to 8) at p widened (the others
   0), or v's first n narrowed to p */
static inline cynorm_v8f cynorm_ldh(const uint16_t* p, ptrdiff_t n, int kind) {
    cynorm_v8h h = {0, 0, 0, 0, 0, 0, 0, 0};
    if (n == 8)
        memcpy(&h, p, sizeof h);
    else
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        h = (cynorm_v8h)_mm_maskz_loadu_epi16((__mmask8)((1u << n) - 1), p);
#else
        memcpy(&h, p, (size_t)n * sizeof(uint16_t));
#endif
    return cynorm_unpack8(h, kind);
}

static inline void cynorm_sth(uint16_t* p, cynorm_v8f v, ptrdiff_t n, int kind) {
    cynorm_v8h o = cynorm_pack8(v, kind);
    if (n == 8)
        cynorm_store8h(p, o);
    else
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        _mm_mask_storeu_epi16(p, (__mmask8)((1u << n) - 1), (__m128i)o);
#else
        memcpy(p, &o, (size_t)n * sizeof(uint16_t));
#endif
}

/* the two as the LOAD(p, n) and STORE(p, v, n, nt) of the sweeps instantiated per element
   type, one kind each (16-bit stores are plain: nt is ignored) */
#define CYNORM_LDH_F16(p, n) cynorm_ldh(p, n, CYNORM_F16)
#define CYNORM_LDH_BF16(p, n) cynorm_ldh(p, n, CYNORM_BF16)
#define CYNORM_STH_F16(p, v, n, nt) cynorm_sth(p, v, n, CYNORM_F16)
#define CYNORM_STH_BF16(p, v, n, nt) cynorm_sth(p, v, n, CYNORM_BF16)

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define CYNORM_HALF16 1
/* the AVX-512 build's blocks of sixteen: cynorm_pack8 and cynorm_half_block on one zmm */

/* the high words of the sixteen lanes of r, in order (bfloat16's narrowing): one vpermw */
static inline __m256i cynorm_high_words16(__m512i r) {
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(
        _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0x001f001d, 0x001b0019, 0x00170015,
                         0x00130011, 0x000f000d, 0x000b0009, 0x00070005, 0x00030001), r));
}

static inline __m256i cynorm_pack16(__m512 v, int kind) {
    if (kind == CYNORM_BF16) {
        const __m512i u = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                     _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                      _mm512_set1_epi32(1)));
        /* NaN: (u | quiet bit) >> 16, as cynorm_f2bf */
        r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u,
                                 _mm512_set1_epi32(0x400000));
        return cynorm_high_words16(r);
    }
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

static inline void cynorm_narrow16(__m512 v, uint16_t* d, int kind) {
    __m256i o = cynorm_pack16(v, kind);
    __asm__("" : "+v"(o));   /* as cynorm_store8h */
    _mm256_storeu_si256((__m256i*)d, o);
}
#else
#define CYNORM_HALF16 0
#endif
#else
#define CYNORM_HALF_VECTORS 0
#endif

/* d[0:n] = s[0:n] widened to float32 */
static inline void cynorm_widen_half(const uint16_t* s, float* d, ptrdiff_t n, int kind) {
    ptrdiff_t j = 0;
    if (kind == CYNORM_BF16) {
#if defined(__AVX512F__)
        for (; j + 16 <= n; j += 16)
            _mm512_storeu_si512((void*)(d + j), _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256((const __m256i*)(s + j))), 16));
#elif defined(__AVX2__)
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_si256((__m256i*)(d + j), _mm256_slli_epi32(_mm256_cvtepu16_epi32(
                _mm_loadu_si128((const __m128i*)(s + j))), 16));
#elif CYNORM_HALF_VECTORS
        for (; j + 8 <= n; j += 8) {
            cynorm_v8h h;
            cynorm_v8u u;
            memcpy(&h, s + j, sizeof h);
            u = __builtin_convertvector(h, cynorm_v8u) << 16;
            memcpy(d + j, &u, sizeof u);
        }
#endif
        for (; j < n; j++)
            d[j] = cynorm_bf2f(s[j]);
        return;
    }
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(d + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + j))));
#endif
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(d + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + j))));
#endif
    for (; j < n; j++)
        d[j] = cynorm_h2f(s[j]);
}

/* d[0:n] = s[0:n] narrowed, rounded to nearest even */
static inline void cynorm_narrow_half(const float* s, uint16_t* d, ptrdiff_t n, int kind) {
    ptrdiff_t j = 0;
#if CYNORM_HALF16
    for (; j + 16 <= n; j += 16)
        cynorm_narrow16(_mm512_loadu_ps(s + j), d + j, kind);
#endif
#if CYNORM_HALF_VECTORS
    for (; j + 8 <= n; j += 8) {
        cynorm_v8f v;
        memcpy(&v, s + j, sizeof v);
        cynorm_narrow8(v, d + j, kind);
    }
#endif
    for (; j < n; j++)
        d[j] = kind == CYNORM_BF16 ? cynorm_f2bf(s[j]) : cynorm_f2h(s[j]);
}

static inline uint16_t cynorm_f2half(float f, int kind) {
    return kind == CYNORM_BF16 ? cynorm_f2bf(f) : cynorm_f2h(f);
}

/* d rounded once to 16 bits, to nearest even: through float32 rounded to odd (truncated, its
   last bit set when inexact), which the 16-bit rounding cannot then tie wrongly (float32's 24
   bits are at least twice a 16-bit significand's plus two) */
static inline uint16_t cynorm_d2half(double d, int kind) {
    float f = (float)d;
    uint32_t u;
    if ((double)f != d && d == d) {
        if (fabs((double)f) > fabs(d))
            f = nextafterf(f, 0.0f);
        memcpy(&u, &f, sizeof u);
        u |= 1u;
        memcpy(&f, &u, sizeof f);
    }
    return cynorm_f2half(f, kind);
}

static inline float cynorm_half2f(uint16_t h, int kind) {
    return kind == CYNORM_BF16 ? cynorm_bf2f(h) : cynorm_h2f(h);
}

/* The residual forms' h = x + r, rounded once to 16 bits, in one pass: h[0:n] written (16-bit)
 * and s[0:n] = h widened back (the row to normalize) */
static inline void cynorm_add_half(const uint16_t* x, const uint16_t* r, uint16_t* h, float* s,
                                   ptrdiff_t n, int kind) {
    ptrdiff_t j = 0;
#if CYNORM_HALF16
    for (; j + 16 <= n; j += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + j));
        __m256i rv = _mm256_loadu_si256((const __m256i*)(r + j));
        __m512 v;
        __m256i o;
        if (kind == CYNORM_BF16)
            v = _mm512_add_ps(
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(xv), 16)),
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rv), 16)));
        else
            v = _mm512_add_ps(_mm512_cvtph_ps(xv), _mm512_cvtph_ps(rv));
        o = cynorm_pack16(v, kind);
        _mm256_storeu_si256((__m256i*)(h + j), o);
        _mm512_storeu_ps(s + j, kind == CYNORM_BF16
            ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(o), 16))
            : _mm512_cvtph_ps(o));
    }
#elif CYNORM_HALF_VECTORS
    for (; j + 8 <= n; j += 8) {
        float a[8], c[8];
        cynorm_widen_half(x + j, a, 8, kind);
        cynorm_widen_half(r + j, c, 8, kind);
        for (int k = 0; k < 8; k++)
            a[k] += c[k];
        cynorm_narrow_half(a, h + j, 8, kind);
        cynorm_widen_half(h + j, s + j, 8, kind);
    }
#endif
    for (; j < n; j++) {
        h[j] = cynorm_f2half(cynorm_half2f(x[j], kind) + cynorm_half2f(r[j], kind), kind);
        s[j] = cynorm_half2f(h[j], kind);
    }
}

/* y[0:n] = x[0:n], 16-bit elements, streamed in the row's whole lines (as cynorm_copy_nt_f) */
#if CYNORM_STREAMING
typedef uint16_t cynorm_nth __attribute__((vector_size(CYNORM_NT_BYTES)));
#if defined(__AVX512F__)
#define CYNORM_NT_STORE_H(p, v) _mm512_stream_si512((void*)(p), (__m512i)(v))
#elif defined(__AVX__)
#define CYNORM_NT_STORE_H(p, v) _mm256_stream_si256((__m256i*)(p), (__m256i)(v))
#else
#define CYNORM_NT_STORE_H(p, v) _mm_stream_si128((__m128i*)(p), (__m128i)(v))
#endif
#define CYNORM_STREAM_H(p, v) CYNORM_STREAM(cynorm_nth, CYNORM_NT_STORE_H, p, v)
CYNORM_COPY_NT(cynorm_copy_nt_h, uint16_t, cynorm_nth, CYNORM_STREAM_H)
#else
static void cynorm_copy_nt_h(const uint16_t* x, uint16_t* y, ptrdiff_t n) {
    memcpy(y, x, n * sizeof(uint16_t));
}
#endif

/* Below this fraction of |b| a float32 output of the 16-bit rows is done again in float64
 * (core/halves_rows.h's bound, and the affine's below) */
#define CYNORM_HALF_CANCEL 0.001953125f /* 2^-9 */

/* The per-feature affine of 16-bit data, y = (x - m) * s + t, for BatchNorm's output (eval, and
 * training once its statistics are known) and the group norms': n elements of a row (at most
 * the scratch's length), narrowed once.  The parameters come twice: m, s, t in float64 (m the
 * mean rounded to one float64, t the bias less what that rounding left out times s), and mf,
 * sf, tf in float32 (mf the mean's leading float, tf = t - (m - mf) * sf, as feature_params
 * makes them); one value for the whole row (per_elem 0) or one per element (per_elem 1).
 *
 * The AVX-512 build computes sixteen at a time in registers in float32, (x - mf) * sf + tf, as
 * the 16-bit rows do (cynorm_half_out16, whose bound this is): while |y| >= 2^-9 |tf| its terms'
 * errors stay below 2^-13 |y|, a quarter of a float16 ulp.  A lane below that, NaN, or (for
 * bfloat16) infinite is computed again in float64, as every element of the other builds is:
 * there the terms' errors are 2^-52 of |x - m| |s| + |t|, far within a quarter of a 16-bit
 * ulp even where t cancels most of the product.  Either way the result is the correctly
 * rounded value or its neighbour.  A float16 lane that overflowed float32 is kept: x - mf is
 * exact-range there (|x| <= 65504), so an infinite fma means |y| far above 65504, whose
 * float16 is that infinity.  A bfloat16 x - mf can overflow where y is finite. */
#if CYNORM_HALF16
/* bfloat16's cynorm_pack16 for lanes known not to be NaN */
static inline __m256i cynorm_pack16_bf_num(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                                       _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                        _mm512_set1_epi32(1)));
    return cynorm_high_words16(r);
}

/* sixteen elements x[0:16] written to y[0:16] (masked: only the lanes of live, the others
 * neither read nor written): (x - mv) * sv + tv in float32, lanes whose |result| is below lv
 * (or NaN; bfloat16: infinite) again in float64 from m, s, t (the sixteen lanes' own,
 * per_elem 1, or one for all, per_elem 0) */
static inline __attribute__((always_inline)) void cynorm_affine_out16(
        const uint16_t* x, uint16_t* y, __m512 mv, __m512 sv, __m512 tv, __m512 lv,
        const double* m, const double* s, const double* t, const int per_elem, const int kind,
        const int masked, __mmask16 live) {
    const __m256i h = masked ? _mm256_maskz_loadu_epi16(live, x)
                             : _mm256_loadu_si256((const __m256i*)x);
    const __m512 v = kind == CYNORM_BF16
        ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        : _mm512_cvtph_ps(h);
    const __m512 r = _mm512_fmadd_ps(_mm512_sub_ps(v, mv), sv, tv), a = _mm512_abs_ps(r);
    __mmask16 ok = _mm512_cmp_ps_mask(a, lv, _CMP_GE_OQ);
    __m256i o;
    int k;
    if (kind == CYNORM_BF16)
        ok = _mm512_mask_cmp_ps_mask(ok, a, _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    if (masked)
        ok |= (__mmask16)~live;
    if (_kortestc_mask16_u8(ok, (__mmask16)0)) {   /* every lane in float32 */
        o = kind == CYNORM_BF16 ? cynorm_pack16_bf_num(r)
                                : _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT
                                                     | _MM_FROUND_NO_EXC);
    } else {
        float u[16], q[16];   /* rare: t cancels the product, or not finite */
        _mm512_storeu_ps(u, v);
        _mm512_storeu_ps(q, r);
        for (k = 0; k < 16; k++)   /* those lanes only */
            if (!((ok >> k) & 1))
                q[k] = per_elem ? (float)(((double)u[k] - m[k]) * s[k] + t[k])
                                : (float)(((double)u[k] - m[0]) * s[0] + t[0]);
        o = cynorm_pack16(_mm512_loadu_ps(q), kind);
    }
    __asm__("" : "+v"(o));   /* as cynorm_store8h */
    if (masked)
        _mm256_mask_storeu_epi16(y, live, o);
    else
        _mm256_storeu_si256((__m256i*)y, o);
}

/* the bound of the float64 redo, 2^-9 |tf|, made in registers from tf (one load fewer than a
 * stored row of it; the same float multiplication, so the same bits) */
static inline __m512 cynorm_affine_bound16(__m512 tv) {
    return _mm512_mul_ps(_mm512_set1_ps(CYNORM_HALF_CANCEL), _mm512_abs_ps(tv));
}

/* cynorm_affine_half's blocks of sixteen, with per_elem and kind constants where it calls
 * this (a loop for each); the index of the first element left */
static inline __attribute__((always_inline)) ptrdiff_t cynorm_affine16(
        const uint16_t* x, uint16_t* y, ptrdiff_t n, const double* m, const double* s,
        const double* t, const float* mf, const float* sf, const float* tf, const int per_elem,
        const int kind) {
    ptrdiff_t j = 0;
    const __m512 mv = _mm512_set1_ps(mf[0]), sv = _mm512_set1_ps(sf[0]);
    const __m512 tv = _mm512_set1_ps(tf[0]), lv = cynorm_affine_bound16(tv);
    for (; j + 16 <= n; j += 16) {
        if (per_elem) {
            const __m512 te = _mm512_loadu_ps(tf + j);
            cynorm_affine_out16(x + j, y + j, _mm512_loadu_ps(mf + j), _mm512_loadu_ps(sf + j),
                                te, cynorm_affine_bound16(te), m + j, s + j, t + j, 1, kind,
                                0, 0xffff);
        } else {
            cynorm_affine_out16(x + j, y + j, mv, sv, tv, lv, m, s, t, 0, kind, 0, 0xffff);
        }
    }
    if (j < n) {   /* the last few, under a mask: the same arithmetic as a whole sixteen */
        const __mmask16 live = (__mmask16)((1u << (unsigned)(n - j)) - 1u);
        if (per_elem) {
            const __m512 te = _mm512_maskz_loadu_ps(live, tf + j);
            cynorm_affine_out16(x + j, y + j, _mm512_maskz_loadu_ps(live, mf + j),
                                _mm512_maskz_loadu_ps(live, sf + j), te,
                                cynorm_affine_bound16(te), m + j, s + j, t + j, 1, kind, 1,
                                live);
        } else {
            cynorm_affine_out16(x + j, y + j, mv, sv, tv, lv, m, s, t, 0, kind, 1, live);
        }
        j = n;
    }
    return j;
}

/* cynorm_affine_cols_half's sixteen columns j..j+16 of rows 0..rows (masked: the lanes of
 * live only): their parameters held in registers down the rows, and the same columns of the
 * next block's rows (rows further on) asked for: walked down the rows, x is not a stream the
 * hardware prefetcher follows */
static inline __attribute__((always_inline)) void cynorm_affine_strip16(
        const uint16_t* x, ptrdiff_t ldx, uint16_t* y, ptrdiff_t ldy, ptrdiff_t rows,
        ptrdiff_t j, const double* m, const double* s, const double* t, const float* mf,
        const float* sf, const float* tf, const int kind, const int masked, __mmask16 live) {
    const __m512 mv = _mm512_maskz_loadu_ps(live, mf + j);
    const __m512 sv = _mm512_maskz_loadu_ps(live, sf + j);
    const __m512 tv = _mm512_maskz_loadu_ps(live, tf + j), lv = cynorm_affine_bound16(tv);
    ptrdiff_t i;
    for (i = 0; i < rows; i++) {
        cynorm_prefetch(x + (i + rows) * ldx + j);
        cynorm_affine_out16(x + i * ldx + j, y + i * ldy + j, mv, sv, tv, lv, m + j, s + j,
                            t + j, 1, kind, masked, live);
    }
}
#endif

static inline void cynorm_affine_half(const uint16_t* x, uint16_t* y, ptrdiff_t n,
                                      const double* m, const double* s, const double* t,
                                      const float* mf, const float* sf, const float* tf,
                                      int per_elem, float* scratch, int kind) {
    ptrdiff_t k;
#if CYNORM_HALF16
    ptrdiff_t j;
    if (per_elem)
        j = kind == CYNORM_BF16
            ? cynorm_affine16(x, y, n, m, s, t, mf, sf, tf, 1, CYNORM_BF16)
            : cynorm_affine16(x, y, n, m, s, t, mf, sf, tf, 1, CYNORM_F16);
    else
        j = kind == CYNORM_BF16
            ? cynorm_affine16(x, y, n, m, s, t, mf, sf, tf, 0, CYNORM_BF16)
            : cynorm_affine16(x, y, n, m, s, t, mf, sf, tf, 0, CYNORM_F16);
    if (j == n)
        return;
    x += j;
    y += j;
    n -= j;
    if (per_elem) {
        m += j;
        s += j;
        t += j;
    }
#else
    (void)mf;
    (void)sf;
    (void)tf;
#endif
    cynorm_widen_half(x, scratch, n, kind);
    if (per_elem) {
        for (k = 0; k < n; k++)
            scratch[k] = (float)(((double)scratch[k] - m[k]) * s[k] + t[k]);
    } else {
        const double ms = m[0], ss = s[0], ts = t[0];
        for (k = 0; k < n; k++)
            scratch[k] = (float)(((double)scratch[k] - ms) * ss + ts);
    }
    cynorm_narrow_half(scratch, y, n, kind);
}

/* cynorm_affine_half with one parameter set per column (per_elem 1) on a block of rows:
 * y[i·ldy + j] from x[i·ldx + j] for rows i < rows, columns j < cols, the parameters of column
 * j at index j.  The AVX-512 build takes sixteen columns at a time down the rows (the last
 * ones under a mask), their parameters in registers (the rows are best a few KiB: they stay
 * in L1 from one strip to the next); the other builds go row by row.  Each element's value is
 * the one cynorm_affine_half gives it. */
static inline void cynorm_affine_cols_half(const uint16_t* x, ptrdiff_t ldx, uint16_t* y,
                                           ptrdiff_t ldy, ptrdiff_t rows, ptrdiff_t cols,
                                           const double* m, const double* s, const double* t,
                                           const float* mf, const float* sf, const float* tf,
                                           float* scratch, int kind) {
#if CYNORM_HALF16
    ptrdiff_t j;
    for (j = 0; j < cols; j += 16) {
        const __mmask16 live = cols - j >= 16 ? (__mmask16)0xffff
                                              : (__mmask16)((1u << (unsigned)(cols - j)) - 1u);
        const int kd = kind == CYNORM_BF16;
        if (live != 0xffff)
            cynorm_affine_strip16(x, ldx, y, ldy, rows, j, m, s, t, mf, sf, tf, kind, 1, live);
        else if (kd)
            cynorm_affine_strip16(x, ldx, y, ldy, rows, j, m, s, t, mf, sf, tf, CYNORM_BF16, 0,
                                  live);
        else
            cynorm_affine_strip16(x, ldx, y, ldy, rows, j, m, s, t, mf, sf, tf, CYNORM_F16, 0,
                                  live);
    }
    (void)scratch;
#else
    ptrdiff_t i;
    for (i = 0; i < rows; i++)
        cynorm_affine_half(x + i * ldx, y + i * ldy, cols, m, s, t, mf, sf, tf, 1, scratch,
                           kind);
#endif
}

#endif /* CYNORM_CORE_HALVES_H */
