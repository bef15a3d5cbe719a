# Compiled kernels of cynorm.
#
# Kernels: moments, LayerNorm forward and BatchNorm normalization.
#
# Accumulators
# ------------
# All statistics are accumulated in float64, whatever the input dtype, and kept in float64
# (count, mean, M2).  A block of at most ``BLOCK`` contiguous elements gets its mean and M2 from
# one pass of sums shifted by one of its values (16 partial sums in two float64 vectors, see
# _simd.h); blocks are merged with Chan's pairwise formula.  One exception, asked for by
# BatchNorm's forward pass on float32 columns (feature_moments' ``fast``): groups of 16 rows
# are summed in float32 on scaled deviations before they join the float64 sums, which leaves
# M2 good to about 1e-7 relative, enough for a float32 output (column_chunk_moments).
#
# The normalized output is computed in the input dtype from ``x - m_hi``, where ``m_hi + m_lo``
# is the float64 mean split into two numbers of the input dtype: the subtraction is exact for data
# far from zero, and m_lo is applied separately (LayerNorm: ``((x - m_hi) - m_lo) * scale``;
# BatchNorm folds it into the shift), so float32 output keeps its accuracy even when the mean
# lies 1e6 standard deviations from zero.
#
# Python validates every argument before calling in here: the kernels trust shapes and do no checks.
#
# This is the body of every kernels module: cynorm._kernels (the platform's baseline ISA) and
# its AVX2 / AVX-512 builds are this one file compiled with different flags (setup.py), and
# cynorm/_isa.py picks one at import from the CPU's features.

cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt, isinf, isfinite, fabs, ilogb, ldexp, NAN
from libc.stdlib cimport calloc, malloc, free
from libc.string cimport memset

from _common cimport (floating, CYNORM_HAVE_OPENMP,
                     CYNORM_BUILD_FLAGS)

cnp.import_array()

cdef enum:
    BLOCK = 2048    # elements per block of the row moments: 16 KiB of float64, fits L1


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(CYNORM_HAVE_OPENMP)


def build_flags():
    """The compiler and linker flags the kernels were built with."""
    return CYNORM_BUILD_FLAGS.decode()


# ---------------------------------------------------------------------------------------------
# Inner C-level functions: one block, one row.
#
# A mean is carried as two doubles, hi + lo: hi is a value of the data's magnitude (a block mean)
# and lo the small remainder.  Centred differences x - hi are exact for data far from zero, so
# the mean is known to better than float64 resolution: float64 output keeps ~1e-15 accuracy
# even when the mean lies 1e6 standard deviations from zero.

cdef extern from "_simd.h" nogil:
    # hi + lo as two floats, mh + ml (float, then double, stays a round trip)
    void cynorm_split_f(double hi, double lo, float* mh, float* ml) noexcept
    # (s1, s2) = (Σd, Σd²) and (Σg', Σg'·d) with d = x - shift and g' = g·w (w may be NULL);
    # the moments take g = w = NULL
    void cynorm_shifted_sums_f(const float* g, const float* w, const float* x, Py_ssize_t n,
                               double shift, double* s1, double* s2) noexcept
    void cynorm_shifted_sums_d(const double* g, const double* w, const double* x, Py_ssize_t n,
                               double shift, double* s1, double* s2) noexcept
    void cynorm_gx_sums_f(const float* g, const float* w, const float* x, Py_ssize_t n,
                          double shift, double* s1, double* s2) noexcept
    void cynorm_gx_sums_d(const double* g, const double* w, const double* x, Py_ssize_t n,
                          double shift, double* s1, double* s2) noexcept
    void cynorm_bn_colsums4_f(const float* g0, const float* g1, const float* g2,
                              const float* g3, const float* x0, const float* x1,
                              const float* x2, const float* x3, const float* m, double* sg,
                              double* sgx, Py_ssize_t F, const float* k, float* d0,
                              Py_ssize_t ld, int nt) noexcept
    void cynorm_bn_colsums4_d(const double* g0, const double* g1, const double* g2,
                              const double* g3, const double* x0, const double* x1,
                              const double* x2, const double* x3, const double* m, double* sg,
                              double* sgx, Py_ssize_t F, const double* k, double* d0,
                              double* d1, double* d2, double* d3) noexcept
    void cynorm_ln_paramgrads4_f(const float** g, const float** x, const float* mh,
                                 const float* ml, const float* rs, double* dw, double* db,
                                 Py_ssize_t D, const float* w, const float* af,
                                 const float* cf, float** dx, int nt) noexcept
    void cynorm_ln_dx_row_f(const float* g, const float* w, const float* x, float* dx,
                            Py_ssize_t n, float mh, float ml, float rs, float af,
                            float cf) noexcept
    void cynorm_prefetch(const void* p) noexcept
    enum: CYNORM_LINE_BYTES
    # column moments: centred sums of four rows / one row (see column_block_centered)
    void cynorm_centered4_f(const float* r0, const float* r1, const float* r2, const float* r3,
                            const double* shift, double* c, double* q, Py_ssize_t fb,
                            Py_ssize_t fe) noexcept
    void cynorm_centered4_d(const double* r0, const double* r1, const double* r2,
                            const double* r3, const double* shift, double* c, double* q,
                            Py_ssize_t fb, Py_ssize_t fe) noexcept
    void cynorm_centered1_f(const float* r0, const double* shift, double* c, double* q,
                            Py_ssize_t F) noexcept
    void cynorm_centered1_d(const double* r0, const double* shift, double* c, double* q,
                            Py_ssize_t F) noexcept
    # BatchNorm's float32 column moments: scaled deviations summed in float32 (column_chunk_moments)
    void cynorm_scaled16_f(const float** rows, const float* s, const float* k, double* c,
                           double* q, Py_ssize_t F) noexcept
    void cynorm_scaled1_f(const float* r0, const float* s, const float* k, double* c,
                          double* q, Py_ssize_t F) noexcept
    float cynorm_unit_scale(double y) noexcept
    void cynorm_ln_gx_sums_f(const float* g, const float* w, const float* x, Py_ssize_t n,
                             float mh, float ml, double* sg, double* sgx, Py_ssize_t ahead_g,
                             Py_ssize_t ahead_x) noexcept
    # the output loops with streaming stores (outputs far larger than the cache)
    void cynorm_sfence() noexcept
    void cynorm_zero_nt_f(float* y, Py_ssize_t n) noexcept
    void cynorm_zero_nt_d(double* y, Py_ssize_t n) noexcept
    void cynorm_apply_nt_f(const float* x, float* y, Py_ssize_t n, float mh, float ml,
                           float rs, const float* w, const float* b) noexcept
    void cynorm_apply_nt_d(const double* x, double* y, Py_ssize_t n, double mh, double ml,
                           double rs, const double* w, const double* b) noexcept
    void cynorm_apply_nt_f_vec(const float* x, float* y, Py_ssize_t n, const float* mh,
                               const float* sc, const float* sh) noexcept
    void cynorm_apply_nt_d_vec(const double* x, double* y, Py_ssize_t n, const double* mh,
                               const double* sc, const double* sh) noexcept
    void cynorm_apply_nt_f_scalar(const float* x, float* y, Py_ssize_t n, float mh, float sc,
                                  float sh) noexcept
    void cynorm_apply_nt_d_scalar(const double* x, double* y, Py_ssize_t n, double mh,
                                  double sc, double sh) noexcept
    void cynorm_bn_dx_nt_f_vec(const float* g, const float* x, float* dx, Py_ssize_t n,
                               const float* mh, const float* k1, const float* k2,
                               const float* k3) noexcept
    void cynorm_bn_dx_nt_d_vec(const double* g, const double* x, double* dx, Py_ssize_t n,
                               const double* mh, const double* k1, const double* k2,
                               const double* k3) noexcept
    void cynorm_bn_dx_nt_f_scalar(const float* g, const float* x, float* dx, Py_ssize_t n,
                                  float mh, float k1, float k2, float k3) noexcept
    void cynorm_bn_dx_nt_d_scalar(const double* g, const double* x, double* dx, Py_ssize_t n,
                                  double mh, double k1, double k2, double k3) noexcept


cdef inline void block_moments(const floating* x, Py_ssize_t n, double* hi, double* lo,
                               double* m2) noexcept nogil:
    """Mean (hi + lo) and M2 of x[0:n], 0 < n <= BLOCK, in one pass of shifted sums.

    With the shift K = x[0], d = x - K is exact for float32 input (and for float64 input near
    K), and M2 = Σd² - (Σd)²/n loses at most (x[0] - mean)² / var ulps, at most n ulps since
    x[0] is one of the n values: below 1e-12 relative for a block of BLOCK elements.  The sums
    are in _simd.h: the one loop GCC does not vectorize well for float64 from Cython.
    """
    cdef double shift = x[0], s = 0.0, q = 0.0, inv_n = 1.0 / n
    if floating is float:
        cynorm_shifted_sums_f(NULL, NULL, x, n, shift, &s, &q)
    else:
        cynorm_shifted_sums_d(NULL, NULL, x, n, shift, &s, &q)
    hi[0] = shift
    lo[0] = s * inv_n
    q = q - s * s * inv_n
    m2[0] = q if not q < 0.0 else 0.0


cdef inline void chan_merge(double* n_a, double* mean_a, double* m2_a,
                            double n_b, double mean_b, double m2_b) noexcept nogil:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a); both means relative to one shift."""
    cdef double n, delta, wb
    if n_b == 0:
        return
    n = n_a[0] + n_b
    wb = n_b / n
    delta = mean_b - mean_a[0]
    mean_a[0] += delta * wb
    m2_a[0] += m2_b + delta * delta * (n_a[0] * wb)
    n_a[0] = n


cdef inline void row_moments(const floating* x, Py_ssize_t n, double* hi, double* lo,
                             double* m2) noexcept nogil:
    """Mean (hi + lo) and M2 of a contiguous row of n >= 1 elements, block by block."""
    cdef double count, bhi = 0.0, blo = 0.0, bm2 = 0.0
    cdef Py_ssize_t start, nb
    nb = n if n < BLOCK else BLOCK
    block_moments(x, nb, hi, lo, m2)
    count = <double>nb
    start = nb
    while start < n:
        nb = n - start if n - start < BLOCK else BLOCK
        block_moments(x + start, nb, &bhi, &blo, &bm2)
        chan_merge(&count, lo, m2, <double>nb, (bhi - hi[0]) + blo, bm2)
        start += nb


cdef inline void split_mean(double hi, double lo, floating* m_hi, floating* m_lo) noexcept nogil:
    """hi + lo as two numbers of the output dtype (x - m_hi is then exact for x near the mean)."""
    if floating is float:
        cynorm_split_f(hi, lo, m_hi, m_lo)
    else:
        m_hi[0] = hi + lo
        m_lo[0] = (hi - m_hi[0]) + lo


# Outputs of at least STREAM_BYTES are written with streaming stores (see _simd.h): they
# cannot stay in the 32 MiB L3 anyway, and a normal store would read each line first.  On one
# thread from STREAM_BYTES_ONE_THREAD: one core reads its L3 no faster than memory (measured,
# LN (4096, 768) float32 and a reader of y after it: call 0.60-0.89 of the time with streaming
# stores, call and reader together 0.97-1.07), where two cores read y back from the L3 faster
# than they wrote it (benchmarks/RESULTS.md, items 28 and 36).
cdef Py_ssize_t STREAM_BYTES = 24 << 20
cdef Py_ssize_t STREAM_BYTES_ONE_THREAD = 8 << 20


cdef inline bint streamed(Py_ssize_t nbytes, int n_threads) noexcept nogil:
    """Whether an output of nbytes written by n_threads threads takes streaming stores."""
    return nbytes >= (STREAM_BYTES_ONE_THREAD if n_threads <= 1 else STREAM_BYTES)

# Below this M2 (2^-900) the squares of a float64 row may have lost bits to underflow.
cdef double TINY_M2 = 1.2e-271
# Above this M2 ((FLT_MAX / 2)^2) a float32 deviation x - mean may overflow float32.
cdef double F32_BIG_M2 = 2.89e76
# the same threshold for the Python side (functional._rescaled)
FLOAT32_BIG_M2 = F32_BIG_M2
# Below this variance (4 / FLT_MAX^2) 1 / sqrt(var + eps) overflows float32.
cdef double F32_TINY_VAR = 3.4e-77


cdef inline void layer_norm_row(const floating* x, floating* y, Py_ssize_t n,
                                const floating* w, const floating* b, double eps,
                                double* mean_out, double* rstd_out,
                                bint stream=False, const floating* nxt=NULL) noexcept nogil:
    cdef double hi = 0.0, lo = 0.0, m2 = 0.0
    row_moments(x, n, &hi, &lo, &m2)
    layer_norm_finish(x, y, n, w, b, eps, hi, lo, m2, 1.0 / sqrt(m2 / n + eps), mean_out,
                      rstd_out, stream, nxt)


cdef enum:
    PREFETCH_CHUNK = 256   # elements of a LayerNorm row per prefetch of the next one
# LayerNorm inputs from PREFETCH_BYTES up read (mostly) from memory, even on 2 threads where
# streaming starts at 24 MiB: their long rows prefetch the next one (apply_prefetching).
# Smaller ones, from the L2 or the L3, only paid for the chunks (benchmarks/RESULTS.md, 70).
cdef Py_ssize_t PREFETCH_BYTES = 8 << 20


cdef inline void apply_plain(const floating* x, floating* y, Py_ssize_t n, floating mh,
                             floating ml, floating rs, const floating* w,
                             const floating* b) noexcept nogil:
    """y = ((x - mh) - ml) * (rs * w) + b with plain stores (w, b: NULL for none)."""
    cdef Py_ssize_t j
    if w != NULL and b != NULL:
        for j in range(n):
            y[j] = ((x[j] - mh) - ml) * (rs * w[j]) + b[j]
    elif w != NULL:
        for j in range(n):
            y[j] = ((x[j] - mh) - ml) * (rs * w[j])
    elif b != NULL:
        for j in range(n):
            y[j] = ((x[j] - mh) - ml) * rs + b[j]
    else:
        for j in range(n):
            y[j] = ((x[j] - mh) - ml) * rs


cdef inline void apply_prefetching(const floating* x, floating* y, Py_ssize_t n, floating mh,
                                   floating ml, floating rs, const floating* w,
                                   const floating* b, const floating* nxt,
                                   bint stream) noexcept nogil:
    """A LayerNorm row's y in chunks that start on its lines, each after a prefetch of the
    same part of nxt, the next row (NULL: none), with streaming stores or plain ones.  The next
    row's statistics then read it from the cache while this row is written, instead of waiting
    on memory (streamed) or on the L3 (plain) once y is done:
    - streamed, (16384, 4096) float32 out=, 2 threads, builds alternated 7 times: 21.6-23.3 ->
      17.0-19.6 ms (benchmarks/RESULTS.md, item 69);
    - plain, from PREFETCH_BYTES: (4096, 768) float32 out=, 2 threads, 1.16-1.30 -> 1.03-1.07
      times BN eval's time (item 70)."""
    cdef Py_ssize_t c0 = 0, c1, k
    cdef Py_ssize_t e = <Py_ssize_t>((-<Py_ssize_t>y) & (CYNORM_LINE_BYTES - 1)) \
        // <Py_ssize_t>sizeof(floating)
    while c0 < n:
        c1 = e + PREFETCH_CHUNK if e + PREFETCH_CHUNK < n else n
        if nxt != NULL:
            k = c0 * <Py_ssize_t>sizeof(floating)
            while k < c1 * <Py_ssize_t>sizeof(floating):
                cynorm_prefetch(<const char*>nxt + k)
                k += CYNORM_LINE_BYTES
        if not stream:
            apply_plain(x + c0, y + c0, c1 - c0, mh, ml, rs, w + c0 if w != NULL else NULL,
                        b + c0 if b != NULL else NULL)
        elif floating is float:
            cynorm_apply_nt_f(x + c0, y + c0, c1 - c0, mh, ml, rs,
                              w + c0 if w != NULL else NULL, b + c0 if b != NULL else NULL)
        else:
            cynorm_apply_nt_d(x + c0, y + c0, c1 - c0, mh, ml, rs,
                              w + c0 if w != NULL else NULL, b + c0 if b != NULL else NULL)
        c0 = c1
        e = c1


cdef inline void layer_norm_finish(const floating* x, floating* y, Py_ssize_t n,
                                   const floating* w, const floating* b, double eps, double hi,
                                   double lo, double m2, double rstd, double* mean_out,
                                   double* rstd_out, bint stream,
                                   const floating* nxt=NULL) noexcept nogil:
    """The rest of a row once its moments (and rstd = 1 / sqrt(m2 / n + eps)) are known (nxt:
    the next row, prefetched while this one is written)."""
    cdef floating mh, ml, rs
    cdef bint rescale
    if floating is float:
        # deviations near FLT_MAX would overflow x - mean in float32, or 1 / std would
        rescale = not m2 <= F32_BIG_M2 or (m2 > 0.0 and m2 / n + eps < F32_TINY_VAR)
    else:
        # squares overflowed float64 (|x| near 1e154 or more), or underflowed (subnormal
        # spreads) with no eps to hide it
        rescale = not isfinite(m2) or (m2 < TINY_M2 and eps < TINY_M2 and m2 > 0.0) or (
            m2 == 0.0 and eps == 0.0)
    if rescale and rescaled_row(x, y, n, w, b, eps, mean_out, rstd_out, stream):
        return
    if not isfinite(m2):
        rstd = NAN   # inf or NaN in the row itself: NaN out, never silent zeros
    if mean_out != NULL:
        mean_out[0] = hi + lo
        rstd_out[0] = rstd
    split_mean(hi, lo, &mh, &ml)
    rs = <floating>rstd
    if stream or nxt != NULL:
        apply_prefetching(x, y, n, mh, ml, rs, w, b, nxt, stream)
    else:
        apply_plain(x, y, n, mh, ml, rs, w, b)


cdef int rescaled_row(const floating* x, floating* y, Py_ssize_t n, const floating* w,
                      const floating* b, double eps, double* mean_out,
                      double* rstd_out, bint stream) noexcept nogil:
    """LayerNorm of a finite row whose statistics leave the float range (float64: M2
    overflows or underflows; float32: x - mean may overflow), computed on the row times 2^k
    (exact for a power of two) with eps times 2^2k: the output is the same, the statistics are
    scaled back.  0 (nothing done) for rows of zeros, rows holding inf or NaN, rows already
    of unit size (no recursion), or when no scratch memory is left."""
    cdef double amax = 0.0, a
    cdef floating* buf
    cdef Py_ssize_t j
    cdef int k
    for j in range(n):
        a = fabs(<double>x[j])
        if not a <= 1.7976931348623157e308:
            return 0
        if a > amax:
            amax = a
    if amax == 0.0:
        return 0
    k = -ilogb(amax)   # the largest element becomes 1 <= |x| < 2
    if k == 0:
        return 0
    buf = <floating*>malloc(n * sizeof(floating))
    if buf == NULL:
        return 0
    for j in range(n):
        buf[j] = <floating>ldexp(<double>x[j], k)
    layer_norm_row(<const floating*>buf, y, n, w, b, ldexp(eps, 2 * k), mean_out, rstd_out,
                   stream)
    free(buf)
    if mean_out != NULL:
        mean_out[0] = ldexp(mean_out[0], -k)
        rstd_out[0] = ldexp(rstd_out[0], k)
    return 1


cdef inline void normalize_row_scalar(const floating* x, floating* y, Py_ssize_t n,
                                      floating mh, floating scale, floating shift,
                                      bint stream=False) noexcept nogil:
    cdef Py_ssize_t j
    if stream:
        if floating is float:
            cynorm_apply_nt_f_scalar(x, y, n, mh, scale, shift)
        else:
            cynorm_apply_nt_d_scalar(x, y, n, mh, scale, shift)
        return
    for j in range(n):
        y[j] = (x[j] - mh) * scale + shift


cdef inline void normalize_row_vector(const floating* x, floating* y, Py_ssize_t n,
                                      const floating* mh, const floating* scale,
                                      const floating* shift, bint stream=False) noexcept nogil:
    cdef Py_ssize_t j
    if stream:
        if floating is float:
            cynorm_apply_nt_f_vec(x, y, n, mh, scale, shift)
        else:
            cynorm_apply_nt_d_vec(x, y, n, mh, scale, shift)
        return
    for j in range(n):
        y[j] = (x[j] - mh[j]) * scale[j] + shift[j]


cdef inline void merge_one(double* n_a, double* hi_a, double* lo_a, double* m2_a, double n_b,
                           double hi_b, double lo_b, double m2_b) noexcept nogil:
    """Merge the moments (n_b, hi_b + lo_b, m2_b) into (n_a, hi_a + lo_a, m2_a), Chan's formula."""
    if n_b == 0:
        return
    if n_a[0] == 0:
        n_a[0] = n_b
        hi_a[0] = hi_b
        lo_a[0] = lo_b
        m2_a[0] = m2_b
        return
    chan_merge(n_a, lo_a, m2_a, n_b, (hi_b - hi_a[0]) + lo_b, m2_b)


cdef enum:
    MAX_BLOCK_ROWS = 1024   # rows per block of the column reduction, at most


cdef inline Py_ssize_t gather_rows(const floating* x, Py_ssize_t ld, Py_ssize_t rb,
                                   Py_ssize_t re, const unsigned char* mask,
                                   const floating** rows) noexcept nogil:
    """Pointers to the rows rb..re of x that the mask keeps (all without a mask); their count.

    Padding rows are skipped where they lie: nothing is copied."""
    cdef Py_ssize_t r, k = 0
    for r in range(rb, re):
        if mask == NULL or mask[r]:
            rows[k] = x + r * ld
            k += 1
    return k


cdef void column_block_sums(const floating** rows, Py_ssize_t nr, Py_ssize_t F,
                            double* s) noexcept nogil:
    """s[f] += sum of rows[r][f] over the nr rows."""
    cdef Py_ssize_t r = 0, f
    cdef const floating* r0
    cdef const floating* r1
    cdef const floating* r2
    cdef const floating* r3
    # Four rows per sweep of the feature axis: a quarter of the loads and stores of s.
    while r + 4 <= nr:
        r0 = rows[r]
        r1 = rows[r + 1]
        r2 = rows[r + 2]
        r3 = rows[r + 3]
        for f in range(F):
            s[f] += (<double>r0[f] + <double>r1[f]) + (<double>r2[f] + <double>r3[f])
        r += 4
    while r < nr:
        r0 = rows[r]
        for f in range(F):
            s[f] += r0[f]
        r += 1


cdef inline void centered4(const floating* r0, const floating* r1, const floating* r2,
                           const floating* r3, const double* shift, double* c, double* q,
                           Py_ssize_t fb, Py_ssize_t fe) noexcept nogil:
    """Columns fb..fe of four rows into c and q (see column_block_centered; _simd.h)."""
    if floating is float:
        cynorm_centered4_f(r0, r1, r2, r3, shift, c, q, fb, fe)
    else:
        cynorm_centered4_d(r0, r1, r2, r3, shift, c, q, fb, fe)


cdef void column_block_centered(const floating** rows, Py_ssize_t nr, Py_ssize_t F,
                                const double* shift, double* c, double* q) noexcept nogil:
    """c[f] += Σ (rows[r][f] - shift[f]) and q[f] += Σ (rows[r][f] - shift[f])²."""
    cdef Py_ssize_t r = 0, fb, fe
    cdef Py_ssize_t line = 64 // sizeof(floating)
    while r + 4 <= nr:
        if floating is double and r + 8 <= nr:
            # float64 rows: a cache line of each of the four rows at a time, asking for the
            # same line of the next four (short row streams restarting every four rows are
            # too short for the hardware prefetcher).  Measured (4096, 768) float64: 1.96 ->
            # 1.50 ms on 1 thread; float32 rows lost by it (0.55 -> 0.59 ms), so they do not.
            fb = 0
            while fb < F:
                fe = fb + line if fb + line < F else F
                cynorm_prefetch(rows[r + 4] + fb)
                cynorm_prefetch(rows[r + 5] + fb)
                cynorm_prefetch(rows[r + 6] + fb)
                cynorm_prefetch(rows[r + 7] + fb)
                centered4(rows[r], rows[r + 1], rows[r + 2], rows[r + 3], shift, c, q, fb, fe)
                fb = fe
        else:
            centered4(rows[r], rows[r + 1], rows[r + 2], rows[r + 3], shift, c, q, 0, F)
        r += 4
    while r < nr:
        if floating is float:
            cynorm_centered1_f(rows[r], shift, c, q, F)
        else:
            cynorm_centered1_d(rows[r], shift, c, q, F)
        r += 1


cdef void column_block_scaled(const float** rows, Py_ssize_t nr, Py_ssize_t F, const float* s,
                              const float* k, double* c, double* q) noexcept nogil:
    """c[f] += Σ d and q[f] += Σ d² with d = (rows[r][f] - s[f]) * k[f] in float32 (_simd.h)."""
    cdef Py_ssize_t r = 0
    while r + 16 <= nr:
        cynorm_scaled16_f(rows + r, s, k, c, q, F)
        r += 16
    while r < nr:
        cynorm_scaled1_f(rows[r], s, k, c, q, F)
        r += 1


cdef enum:
    # rows of the float64 block that gives the float32 sweep its shifts and scales (the more
    # rows it takes, the more of a small input goes through the slower float64 sweep)
    FIRST_BLOCK_ROWS = 16
    # rows of the float32 sweep's blocks: read once each, so no need to stay in cache; long
    # blocks make the per-feature merges rare
    SCALED_BLOCK_ROWS = 128


cdef bint scales_from_first_block(const double* hi, const double* m2, double nb, Py_ssize_t F,
                                  float* k) noexcept nogil:
    """The power of two k[f] bringing column f's deviations near 1, from its first block: its
    standard deviation times k in [1, 2), or, for a constant first block, its value times k in
    [1, 2).  False when some column has no scale (a first block of zeros, a non-finite value,
    or a scale beyond 2^±120): the chunk then keeps the float64 sweep.

    Why float32 squares then lose nothing that matters: a scaled square lost to underflow is
    below 2^-126.  With the first block's standard deviation, M2 * k^2 is at least that block's
    row count; with a constant first block, any other float32 value lies at least 2^-24 of it
    away, so a scaled deviation of a value other than it is at least 2^-25.  Either way the
    loss is some 2^-76 of M2 or less.  Squares too large for float32 give inf, and the chunk is
    redone in float64."""
    cdef Py_ssize_t f
    cdef double v
    for f in range(F):
        v = m2[f] / nb
        if v > 0.0:
            k[f] = cynorm_unit_scale(sqrt(v))
        else:
            k[f] = cynorm_unit_scale(fabs(hi[f]))
        if k[f] == 0.0:   # also for inf / NaN (v > 0 is False for NaN: hi is NaN then)
            return False
    return True


cdef inline void merge_block(Py_ssize_t F, double nb, double na, const double* c,
                             const double* q, const double* hi, double* lo, double* m2,
                             const float* s, const float* k) noexcept nogil:
    """Chan's merge of a block of nb rows, its centred sums c = Σ(x - hi) and q = Σ(x - hi)²,
    into the na rows before it (mean hi + lo, M2 m2).  With s (the float32 sweep) c and q are
    sums of (x - s)·k: 1 / k scales them back and s - hi (exact) moves the block's mean onto
    hi."""
    cdef Py_ssize_t f
    cdef double n = na + nb, inv_nb = 1.0 / nb, wb, wa, rel, m2b, delta, ik
    wb = nb / n
    wa = na * wb
    for f in range(F):
        rel = c[f] * inv_nb
        m2b = q[f] - c[f] * rel
        if s != NULL:
            ik = 1.0 / <double>k[f]
            m2b = m2b * ik * ik
            rel = rel * ik + (<double>s[f] - hi[f])
        m2b = m2b if not m2b < 0.0 else 0.0
        delta = rel - lo[f]
        lo[f] += delta * wb
        m2[f] += m2b + delta * delta * wa


cdef void column_chunk_moments(const floating* x, Py_ssize_t ld, Py_ssize_t first,
                               Py_ssize_t last, Py_ssize_t F, Py_ssize_t rows_per_block,
                               const unsigned char* mask, double* count, double* hi, double* lo,
                               double* m2, double* c, double* q, float* sk) noexcept nogil:
    """Per-column moments of rows first..last of a row-major (rows, F) array, row stride ld,
    over the rows the mask keeps (every row without a mask).

    Rows are taken in blocks that stay in cache.  The first non-empty block gets a corrected
    two-pass: its means become the shifts hi.  Every later block is one pass of sums of x - hi
    and (x - hi)², merged into lo and M2 by Chan's formula.  With hi the mean of a block of the
    same data, the rounding of Σ(x - hi)² stays a few float64 ulps of the total M2.

    sk (float32 rows only; NULL for the float64 sweep): scratch of 2 * F floats.  The first
    block is then FIRST_BLOCK_ROWS rows, and the blocks after it take the float32 sweep
    (column_block_scaled, SCALED_BLOCK_ROWS rows a block): deviations from s, the running mean
    rounded to float32 (s - hi, exact in float64, moves each block's mean back onto hi),
    scaled by powers of two k from the first block so that their squares stay far from
    float32's over- and underflow; Chan's merge stays in float64.  Each group of 16 rows
    rounds Σ(x - s)² to a few float32 ulps, so M2 is good to about 1e-7 relative (a few 1e-7
    when the batch changes regime part-way, Σ(x - s)² then being a few times M2): enough for
    BatchNorm's float32 output, where the float64 sweep gives float64 ulps.  A chunk whose
    scaled sums overflowed (or met inf / NaN) is redone with the float64 sweep; one whose first
    block gives no scale keeps the float64 sweep (rows_per_block rows a block).
    """
    cdef const floating* rows[MAX_BLOCK_ROWS]
    cdef Py_ssize_t rb = first, re, f, nr
    cdef double nb, inv_nb
    cdef bint scaled = False, redo = False
    cdef float* s = sk
    cdef float* k = sk + F if sk != NULL else NULL
    count[0] = 0.0
    for f in range(F):
        hi[f] = 0.0
        lo[f] = 0.0
        m2[f] = 0.0
    if rows_per_block > MAX_BLOCK_ROWS:
        rows_per_block = MAX_BLOCK_ROWS
    while rb < last:
        if sk == NULL or (count[0] > 0 and not scaled):
            re = rb + rows_per_block
        else:
            re = rb + (SCALED_BLOCK_ROWS if scaled else FIRST_BLOCK_ROWS)
        re = re if re < last else last
        nr = gather_rows(x, ld, rb, re, mask, rows)
        rb = re
        if nr == 0:
            continue
        nb = <double>nr
        inv_nb = 1.0 / nb
        for f in range(F):
            c[f] = 0.0
            q[f] = 0.0
        if scaled:
            if floating is float:
                for f in range(F):
                    s[f] = <float>(hi[f] + lo[f])
                column_block_scaled(rows, nr, F, s, k, c, q)
        else:
            if count[0] == 0:
                column_block_sums(rows, nr, F, hi)
                for f in range(F):
                    hi[f] *= inv_nb
            column_block_centered(rows, nr, F, hi, c, q)
        merge_block(F, nb, count[0], c, q, hi, lo, m2, s if scaled else NULL, k)
        count[0] += nb
        if floating is float:
            if sk != NULL and count[0] == nb:
                scaled = scales_from_first_block(hi, m2, nb, F, k)
    if floating is float:
        if scaled:
            for f in range(F):
                if not (isfinite(m2[f]) and isfinite(lo[f])):
                    redo = True
                    break
            if redo:   # float32 overflow, or inf / NaN in x: the float64 sweep's results
                column_chunk_moments(x, ld, first, last, F, rows_per_block, mask, count, hi,
                                     lo, m2, c, q, NULL)


# ---------------------------------------------------------------------------------------------
# Fused implementations on raw pointers.  Rows are ``ld`` elements apart (negative for reversed
# views) and each row is contiguous.  Each kernel is one function over a range of rows; the
# drivers run it on the calling thread, or on n_threads contiguous ranges under prange.  (A
# one-thread prange still costs a thread-team round trip, ~0.6 µs, a third of a small call.)

cdef enum:
    SHORT_ROW = 512    # LayerNorm rows up to this long are done SHORT_ROWS at a time
    SHORT_ROWS = 8


cdef inline Py_ssize_t chunk(Py_ssize_t M, Py_ssize_t t, Py_ssize_t T) noexcept nogil:
    return (M * t) // T


cdef inline void zero_row(floating* y, Py_ssize_t n, bint stream=False) noexcept nogil:
    if stream:
        if floating is float:
            cynorm_zero_nt_f(y, n)
        else:
            cynorm_zero_nt_d(y, n)
        return
    memset(y, 0, n * sizeof(floating))


cdef void layer_norm_rows(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D, const floating* w,
                          const floating* b, double eps, double* mean, double* rstd,
                          const unsigned char* mask, bint write_padding,
                          bint stream, bint prefetch) noexcept nogil:
    # padding rows (mask 0) are not computed: written as 0 (or left alone when y is known to
    # hold zeros already), their statistics left alone; prefetch: long rows prefetch the next
    # one while they are written (apply_prefetching)
    cdef Py_ssize_t i, e, k
    cdef double hi[SHORT_ROWS]
    cdef double lo[SHORT_ROWS]
    cdef double m2[SHORT_ROWS]
    cdef double rs[SHORT_ROWS]
    if D > SHORT_ROW:
        for i in range(r0, r1):
            if mask != NULL and not mask[i]:
                if write_padding:
                    zero_row(y + i * ldy, D, stream)
                continue
            layer_norm_row(x + i * ldx, y + i * ldy, D, w, b, eps,
                           mean + i if mean != NULL else NULL,
                           rstd + i if rstd != NULL else NULL, stream,
                           x + (i + 1) * ldx if prefetch and i + 1 < r1 else NULL)
    else:
        # short rows, a few at a time: their moments, then the divisions and square roots
        # together (one vector instruction instead of a latency chain per row), then the rest
        i = r0
        while i < r1:
            e = i + SHORT_ROWS if i + SHORT_ROWS < r1 else r1
            for k in range(e - i):
                hi[k] = 0.0
                lo[k] = 0.0
                m2[k] = 0.0
                if mask == NULL or mask[i + k]:
                    row_moments(x + (i + k) * ldx, D, &hi[k], &lo[k], &m2[k])
            for k in range(SHORT_ROWS):
                rs[k] = 1.0 / sqrt(m2[k] / D + eps)
            for k in range(e - i):
                if mask != NULL and not mask[i + k]:
                    if write_padding:
                        zero_row(y + (i + k) * ldy, D, stream)
                    continue
                layer_norm_finish(x + (i + k) * ldx, y + (i + k) * ldy, D, w, b, eps, hi[k],
                                  lo[k], m2[k], rs[k], mean + i + k if mean != NULL else NULL,
                                  rstd + i + k if rstd != NULL else NULL, stream)
            i = e
    if stream:
        cynorm_sfence()


cdef void _layer_norm(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                      Py_ssize_t M, Py_ssize_t D, const floating* w, const floating* b,
                      double* mean, double* rstd, double eps, const unsigned char* mask,
                      bint write_padding, int n_threads) noexcept nogil:
    cdef Py_ssize_t t, nbytes = M * D * <Py_ssize_t>sizeof(floating)
    cdef bint stream = streamed(nbytes, n_threads)
    cdef bint prefetch = stream or nbytes >= PREFETCH_BYTES
    if n_threads <= 1:
        layer_norm_rows(x, ldx, y, ldy, 0, M, D, w, b, eps, mean, rstd, mask, write_padding,
                        stream, prefetch)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        layer_norm_rows(x, ldx, y, ldy, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), D,
                        w, b, eps, mean, rstd, mask, write_padding, stream, prefetch)


cdef void moments_rows(const floating* x, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1,
                       Py_ssize_t L, double* parts) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(r0, r1):
        row_moments(x + i * ld, L, &parts[3 * i], &parts[3 * i + 1], &parts[3 * i + 2])


cdef double _row_feature_moments(const floating* x, Py_ssize_t ld, Py_ssize_t M, Py_ssize_t L,
                                 Py_ssize_t C, double* parts, double* stats,
                                 int n_threads) noexcept nogil:
    """Moments of rows (row i belongs to feature i % C), merged per feature into stats (3, C)."""
    cdef Py_ssize_t i, a, c, t
    cdef double n = 0.0
    if n_threads <= 1:
        moments_rows(x, ld, 0, M, L, parts)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
            moments_rows(x, ld, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), L, parts)
    for c in range(C):
        n = 0.0
        for a in range(M // C):
            i = a * C + c
            merge_one(&n, &stats[c], &stats[C + c], &stats[2 * C + c], <double>L,
                      parts[3 * i], parts[3 * i + 1], parts[3 * i + 2])
    return n


cdef double _column_feature_moments(const floating* x, Py_ssize_t ld, Py_ssize_t M,
                                    Py_ssize_t F, Py_ssize_t C, Py_ssize_t T,
                                    Py_ssize_t rows_per_block, const unsigned char* mask,
                                    double* parts, double* stats, bint fast) noexcept nogil:
    """Moments of the columns of a (M, F) array over T row chunks in parallel, then merged per
    feature into stats (3, C): column j belongs to feature j // (F // C).  fast: float32 rows
    take the float32 sweep (column_chunk_moments)."""
    cdef Py_ssize_t t, j, c, L = F // C, stride = 2 + 6 * F
    cdef double* p
    cdef double n = 0.0
    cdef int n_threads = <int>T
    cdef bint f32_sweep = fast and floating is float
    # parts: per chunk [count, pad] + 5 arrays of F doubles (hi, lo, m2, and scratch c, q)
    # + F doubles of scratch for the float32 sweep (2 F floats)
    if T == 1:
        column_chunk_moments(x, ld, 0, M, F, rows_per_block, mask, parts, parts + 2,
                             parts + 2 + F, parts + 2 + 2 * F, parts + 2 + 3 * F,
                             parts + 2 + 4 * F,
                             <float*>(parts + 2 + 5 * F) if f32_sweep else NULL)
    else:
        for t in prange(T, num_threads=n_threads, schedule="static", chunksize=1):
            p = parts + t * stride
            column_chunk_moments(x, ld, chunk(M, t, T), chunk(M, t + 1, T), F, rows_per_block,
                                 mask, p, p + 2, p + 2 + F, p + 2 + 2 * F, p + 2 + 3 * F,
                                 p + 2 + 4 * F, <float*>(p + 2 + 5 * F) if f32_sweep else NULL)
    for c in range(C):
        n = 0.0
        for t in range(T):
            p = parts + t * stride
            for j in range(c * L, (c + 1) * L):
                merge_one(&n, &stats[c], &stats[C + c], &stats[2 * C + c], p[0], p[2 + j],
                          p[2 + F + j], p[2 + 2 * F + j])
    return n


cdef void normalize_rows_range(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                               Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L, Py_ssize_t C,
                               const floating* params, bint stream) noexcept nogil:
    # params rows: m_hi, scale, shift; row i of x belongs to feature i % C
    cdef Py_ssize_t i, c
    for i in range(r0, r1):
        c = i % C
        normalize_row_scalar(x + i * ldx, y + i * ldy, L, params[c], params[C + c],
                             params[2 * C + c], stream)
    if stream:
        cynorm_sfence()


cdef void normalize_columns_range(const floating* x, Py_ssize_t ldx, floating* y,
                                  Py_ssize_t ldy, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F,
                                  Py_ssize_t C, const floating* params,
                                  const unsigned char* mask, bint write_padding,
                                  bint stream) noexcept nogil:
    # column j of x belongs to feature j // (F // C); masked rows are written as 0 (or left
    # alone when y is known to hold zeros)
    cdef Py_ssize_t i, c, L = F // C
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            if write_padding:
                zero_row(y + i * ldy, F, stream)
        elif L == 1:
            normalize_row_vector(x + i * ldx, y + i * ldy, F, params, params + C, params + 2 * C,
                                 stream)
        else:
            for c in range(C):
                normalize_row_scalar(x + i * ldx + c * L, y + i * ldy + c * L, L, params[c],
                                     params[C + c], params[2 * C + c], stream)
    if stream:
        cynorm_sfence()


cdef void _normalize(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                     Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, bint by_rows,
                     const floating* params, const unsigned char* mask, bint write_padding,
                     int n_threads) noexcept nogil:
    cdef Py_ssize_t t
    cdef bint stream = streamed(M * N * <Py_ssize_t>sizeof(floating), n_threads)
    if n_threads <= 1:
        if by_rows:
            normalize_rows_range(x, ldx, y, ldy, 0, M, N, C, params, stream)
        else:
            normalize_columns_range(x, ldx, y, ldy, 0, M, N, C, params, mask, write_padding,
                                    stream)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        if by_rows:
            normalize_rows_range(x, ldx, y, ldy, chunk(M, t, n_threads),
                                 chunk(M, t + 1, n_threads), N, C, params, stream)
        else:
            normalize_columns_range(x, ldx, y, ldy, chunk(M, t, n_threads),
                                    chunk(M, t + 1, n_threads), N, C, params, mask,
                                    write_padding, stream)


cdef inline void feature_params(double hi, double lo, double var, double eps, const floating* w,
                                const floating* b, Py_ssize_t c, Py_ssize_t C,
                                floating* params) noexcept nogil:
    """Column c of params (3, C): m_hi, scale = w / sqrt(var + eps), shift = b - m_lo * scale.

    y = (x - m_hi) * scale + shift: x - m_hi is exact for x near the mean, and the remainder
    m_lo of the mean, folded into shift, is applied at the precision of the output.
    """
    cdef double invstd = 1.0 / sqrt(var + eps), scale
    cdef floating mh, ml
    if isinf(invstd):   # var + eps == 0: no defined output, NaN as torch gives
        invstd = NAN
    if isinf(var):      # the squares overflowed float64: NaN, never silent zeros
        invstd = NAN
    split_mean(hi, lo, &mh, &ml)
    scale = invstd * w[c] if w != NULL else invstd
    params[c] = mh
    params[C + c] = <floating>scale
    params[2 * C + c] = <floating>((b[c] if b != NULL else 0.0) - <double>ml * <double>(<floating>scale))


cdef void _batch_norm_params(const double* hi, const double* lo, const double* m2,
                             double var_scale, const floating* w, const floating* b,
                             double eps, Py_ssize_t C, floating* params) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        feature_params(hi[c], lo[c], m2[c] * var_scale, eps, w, b, c, C, params)


cdef void _running_params(const floating* rm, const floating* rv, const floating* w,
                          const floating* b, double eps, Py_ssize_t C,
                          floating* params) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        feature_params(rm[c], 0.0, rv[c], eps, w, b, c, C, params)


cdef void _update_running(floating* rm, floating* rv, const double* stats, Py_ssize_t C,
                          double count, double momentum) noexcept nogil:
    cdef Py_ssize_t c
    cdef double unbias = 1.0 / (count - 1.0)
    for c in range(C):
        rm[c] = <floating>((1.0 - momentum) * rm[c] + momentum * (stats[c] + stats[C + c]))
        rv[c] = <floating>((1.0 - momentum) * rv[c] + momentum * (stats[2 * C + c] * unbias))


# ---------------------------------------------------------------------------------------------
# Python entry points.  Python validated the arguments already; these repeat only the checks
# without which a mistake would read or write out of bounds, then dispatch on the dtype once.

cdef inline int is_float32(cnp.ndarray a) except -1:
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return 1
    if t == cnp.NPY_FLOAT64:
        return 0
    raise TypeError(f"kernels take float32 or float64 arrays, got {a.dtype}")


cdef Py_ssize_t row_stride(cnp.ndarray a, Py_ssize_t rows, Py_ssize_t cols,
                           bint writable) except? -1:
    # except? -1: a reversed view one element wide has a row stride of -1, not an error
    """Elements from one row to the next of ``a`` seen as (rows, cols) with contiguous rows.

    ``a`` is either C-contiguous (any ndim) or 2-D with unit inner stride.
    """
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(a)
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError("output array is read-only")
    if cnp.PyArray_SIZE(a) != rows * cols:
        raise ValueError(f"array of {cnp.PyArray_SIZE(a)} elements is not ({rows}, {cols})")
    if cnp.PyArray_IS_C_CONTIGUOUS(a):
        return cols
    if (cnp.PyArray_NDIM(a) == 2 and (cols <= 1 or cnp.PyArray_STRIDE(a, 1) == itemsize)
            and cnp.PyArray_STRIDE(a, 0) % itemsize == 0):
        return cnp.PyArray_STRIDE(a, 0) // itemsize
    raise ValueError("kernels need rows with unit inner stride")


cdef inline void* optional_data(cnp.ndarray a, Py_ssize_t n, int want_float32) except? NULL:
    if a is None:
        return NULL
    if cnp.PyArray_SIZE(a) != n or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"expected a contiguous array of {n} elements")
    if is_float32(a) != want_float32:
        raise TypeError("parameter dtype differs from the input's")
    return cnp.PyArray_DATA(a)


cdef inline double* float64_data(cnp.ndarray a, Py_ssize_t n, bint written=True) except? NULL:
    """n contiguous float64 of a, or NULL for None; writable unless only read (not written)."""
    if a is None:
        return NULL
    if (cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT64 or cnp.PyArray_SIZE(a) < n
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or (written and not cnp.PyArray_ISWRITEABLE(a))):
        raise ValueError(f"expected a {'writable ' if written else ''}contiguous float64 array "
                         f"of {n} elements")
    return <double*>cnp.PyArray_DATA(a)


cdef inline const unsigned char* mask_data(cnp.ndarray mask, Py_ssize_t rows) except? NULL:
    """The row mask (one byte per row: bool or uint8, contiguous), or NULL for None."""
    if mask is None:
        return NULL
    if (cnp.PyArray_ITEMSIZE(mask) != 1 or cnp.PyArray_SIZE(mask) != rows
            or not cnp.PyArray_IS_C_CONTIGUOUS(mask)):
        raise ValueError(f"the row mask must be a contiguous bool array of {rows} elements")
    return <const unsigned char*>cnp.PyArray_DATA(mask)


def layer_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight,
               cnp.ndarray bias, cnp.ndarray mean, cnp.ndarray rstd, double eps, int n_threads,
               cnp.ndarray mask=None, bint write_padding=True):
    """y = (x - mean) * rstd * weight + bias over each row of D elements of x.

    x and y (same dtype) are C-contiguous or 2-D with contiguous rows; weight and bias are
    contiguous arrays of D elements or None; mean and rstd (float64, one per row) receive the
    statistics unless they are None.  mask (one bool per row, or None): rows it marks False are
    padding, not computed and written as 0 (not written at all with write_padding=False, for
    a y that holds zeros already: fresh zeroed pages then stay untouched).
    """
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef const unsigned char* mk = mask_data(mask, M)
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldy = row_stride(y, M, D, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef void* b = optional_data(bias, D, f32)
    cdef double* mp = float64_data(mean, M)
    cdef double* rp = float64_data(rstd, M)
    if is_float32(y) != f32:
        raise TypeError("x and y must have the same dtype")
    if M == 0:
        return
    with nogil:
        if f32:
            _layer_norm(<const float*>cnp.PyArray_DATA(x), ldx, <float*>cnp.PyArray_DATA(y), ldy,
                        M, D, <const float*>w, <const float*>b, mp, rp, eps, mk,
                        write_padding, n_threads)
        else:
            _layer_norm(<const double*>cnp.PyArray_DATA(x), ldx, <double*>cnp.PyArray_DATA(y),
                        ldy, M, D, <const double*>w, <const double*>b, mp, rp, eps, mk,
                        write_padding, n_threads)


def feature_moments(cnp.ndarray x, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t C,
                    bint by_rows, cnp.ndarray stats, int n_threads, Py_ssize_t rows_per_block=64,
                    cnp.ndarray mask=None, bint fast=False):
    """Per-feature moments of x seen as (rows, cols): stats (3, C) float64 receives the mean
    as hi + lo and M2; returns the count per feature, negated when some M2 is not finite.

    by_rows: row i belongs to feature i % C (the (N, C, L) layout with long L, rows of L).
    Otherwise column j belongs to feature j // (cols // C) ((N, C) and short L), reduced down
    the columns over row chunks, one per thread; mask (one bool per row, column layout only)
    keeps the rows it marks True.  fast (column layout, float32 x): M2 to about 1e-7 relative
    instead of float64 ulps, in about half the time (BatchNorm's forward pass; see
    column_chunk_moments).
    """
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef Py_ssize_t ld = row_stride(x, rows, cols, False)
    cdef int f32 = is_float32(x)
    cdef double* st = float64_data(stats, 3 * C)
    cdef Py_ssize_t T, j
    cdef double n
    cdef double* parts
    if C <= 0 or rows * cols == 0 or (by_rows and rows % C) or (not by_rows and cols % C):
        raise ValueError("feature_moments: inconsistent shape")
    if by_rows and mk != NULL:
        raise ValueError("feature_moments: a row mask needs the column layout")
    T = 1 if by_rows else max(1, min(n_threads, rows // 64))
    parts = <double*>malloc(sizeof(double) * (3 * rows if by_rows else T * (2 + 6 * cols)))
    if parts == NULL:
        raise MemoryError()
    try:
        with nogil:
            if by_rows and f32:
                n = _row_feature_moments(<const float*>cnp.PyArray_DATA(x), ld, rows, cols, C,
                                         parts, st, n_threads)
            elif by_rows:
                n = _row_feature_moments(<const double*>cnp.PyArray_DATA(x), ld, rows, cols, C,
                                         parts, st, n_threads)
            elif f32:
                n = _column_feature_moments(<const float*>cnp.PyArray_DATA(x), ld, rows, cols, C,
                                            T, rows_per_block, mk, parts, st, fast)
            else:
                n = _column_feature_moments(<const double*>cnp.PyArray_DATA(x), ld, rows, cols,
                                            C, T, rows_per_block, mk, parts, st, False)
    finally:
        free(parts)
    for j in range(C):
        if not (st[2 * C + j] <= (F32_BIG_M2 if f32 else 1.7976931348623157e308)):
            # an M2 overflowed float64, a float32 x - mean may overflow float32, or the data
            # hold inf / NaN: the caller decides
            return -n
    return n


def batch_norm_params(cnp.ndarray stats, double var_scale, cnp.ndarray weight,
                      cnp.ndarray bias, double eps, cnp.ndarray params):
    """params (3, C) in the input dtype: m_hi, scale = weight / sqrt(var + eps), shift.

    stats (3, C) float64 holds the mean as hi + lo and var / var_scale.
    """
    cdef Py_ssize_t C = cnp.PyArray_SIZE(params) // 3
    cdef int f32 = is_float32(params)
    cdef double* st = float64_data(stats, 3 * C)
    cdef void* w = optional_data(weight, C, f32)
    cdef void* b = optional_data(bias, C, f32)
    if not cnp.PyArray_IS_C_CONTIGUOUS(params) or cnp.PyArray_SIZE(params) != 3 * C:
        raise ValueError("params must be a contiguous (3, C) array")
    if f32:
        _batch_norm_params(st, st + C, st + 2 * C, var_scale, <const float*>w, <const float*>b,
                           eps, C, <float*>cnp.PyArray_DATA(params))
    else:
        _batch_norm_params(st, st + C, st + 2 * C, var_scale, <const double*>w,
                           <const double*>b, eps, C, <double*>cnp.PyArray_DATA(params))


def normalize_running(cnp.ndarray x, cnp.ndarray y, Py_ssize_t rows, Py_ssize_t cols,
                      bint by_rows, cnp.ndarray running_mean, cnp.ndarray running_var,
                      cnp.ndarray weight, cnp.ndarray bias, double eps, int n_threads,
                      cnp.ndarray mask=None, bint write_padding=True):
    """Eval-mode BatchNorm in one call: params from the running statistics, then normalize.

    running_mean, running_var, weight and bias are contiguous arrays of C elements in x's
    dtype (weight, bias may be None); features laid out as in feature_moments.
    """
    cdef Py_ssize_t C = cnp.PyArray_SIZE(running_mean)
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldy = row_stride(y, rows, cols, True)
    cdef int f32 = is_float32(x)
    cdef void* rm = optional_data(running_mean, C, f32)
    cdef void* rv = optional_data(running_var, C, f32)
    cdef void* w = optional_data(weight, C, f32)
    cdef void* b = optional_data(bias, C, f32)
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef void* params
    if by_rows and mk != NULL:
        raise ValueError("normalize_running: a row mask needs the column layout")
    if is_float32(y) != f32 or rm == NULL or rv == NULL:
        raise TypeError("x, y and the running statistics must share one dtype")
    if C <= 0 or (by_rows and rows % C) or (not by_rows and cols % C):
        raise ValueError("normalize_running: inconsistent shape")
    if rows * cols == 0:
        return
    params = malloc(3 * C * cnp.PyArray_ITEMSIZE(x))
    if params == NULL:
        raise MemoryError()
    with nogil:
        if f32:
            _running_params(<const float*>rm, <const float*>rv, <const float*>w,
                            <const float*>b, eps, C, <float*>params)
            _normalize(<const float*>cnp.PyArray_DATA(x), ldx, <float*>cnp.PyArray_DATA(y), ldy,
                       rows, cols, C, by_rows, <const float*>params, mk, write_padding,
                       n_threads)
        else:
            _running_params(<const double*>rm, <const double*>rv, <const double*>w,
                            <const double*>b, eps, C, <double*>params)
            _normalize(<const double*>cnp.PyArray_DATA(x), ldx, <double*>cnp.PyArray_DATA(y),
                       ldy, rows, cols, C, by_rows, <const double*>params, mk, write_padding,
                       n_threads)
    free(params)


def update_running(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray stats,
                   double count, double momentum):
    """r = (1 - momentum) r + momentum batch, in place; running_var gets the unbiased variance."""
    cdef Py_ssize_t C = cnp.PyArray_SIZE(running_mean)
    cdef double* st = float64_data(stats, 3 * C)
    cdef int f32 = is_float32(running_mean)
    if (cnp.PyArray_SIZE(running_var) != C or is_float32(running_var) != f32
            or not cnp.PyArray_IS_C_CONTIGUOUS(running_mean)
            or not cnp.PyArray_IS_C_CONTIGUOUS(running_var)
            or not cnp.PyArray_ISWRITEABLE(running_mean)
            or not cnp.PyArray_ISWRITEABLE(running_var)):
        raise ValueError("running buffers must be writable contiguous arrays of one dtype")
    if f32:
        _update_running(<float*>cnp.PyArray_DATA(running_mean),
                        <float*>cnp.PyArray_DATA(running_var), st, C, count, momentum)
    else:
        _update_running(<double*>cnp.PyArray_DATA(running_mean),
                        <double*>cnp.PyArray_DATA(running_var), st, C, count, momentum)


def normalize(cnp.ndarray x, cnp.ndarray y, Py_ssize_t rows, Py_ssize_t cols,
              bint by_rows, cnp.ndarray params, int n_threads, cnp.ndarray mask=None,
              bint write_padding=True):
    """y = (x - m_hi) * scale + shift per feature, x and y seen as (rows, cols).

    params (3, C) in x's dtype (see feature_params); features laid out as in feature_moments.
    """
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldy = row_stride(y, rows, cols, True)
    cdef int f32 = is_float32(x)
    cdef Py_ssize_t C = cnp.PyArray_SIZE(params) // 3
    cdef void* p = optional_data(params, 3 * C, f32)
    cdef const unsigned char* mk = mask_data(mask, rows)
    if by_rows and mk != NULL:
        raise ValueError("normalize: a row mask needs the column layout")
    if is_float32(y) != f32:
        raise TypeError("x and y must have the same dtype")
    if C <= 0 or (by_rows and rows % C) or (not by_rows and cols % C):
        raise ValueError("normalize: inconsistent shape")
    if rows * cols == 0:
        return
    with nogil:
        if f32:
            _normalize(<const float*>cnp.PyArray_DATA(x), ldx, <float*>cnp.PyArray_DATA(y), ldy,
                       rows, cols, C, by_rows, <const float*>p, mk, write_padding, n_threads)
        else:
            _normalize(<const double*>cnp.PyArray_DATA(x), ldx, <double*>cnp.PyArray_DATA(y),
                       ldy, rows, cols, C, by_rows, <const double*>p, mk, write_padding,
                       n_threads)
