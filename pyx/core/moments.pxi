# Core: block moments and Chan's merge, and the two-term mean.
#
# All statistics are accumulated in float64, whatever the input dtype, and kept as (count,
# mean, M2).  A block of at most BLOCK contiguous elements gets its mean and M2 from one pass
# of sums shifted by its first value (16 partial sums in two float64 vectors, core/sums.h),
# and a second pass shifted by its mean where that value lay far from it (far_shift); blocks
# are merged with Chan's pairwise formula.  A mean is carried as two doubles, hi + lo:
# hi is a value of the data's magnitude (a block mean) and lo the small remainder.  Centred
# differences x - hi are exact for data far from zero, so the mean is known to better than
# float64 resolution: float64 output keeps ~1e-15 accuracy even when the mean lies 1e6
# standard deviations from zero.  split_mean gives it as two numbers of the input dtype.
#
# gx_sums is the backward passes' (Σg', Σg'·(x - shift)) over a block, with the same sums.

cdef extern from "core/simd.h" nogil:
    # hi + lo as two floats, mh + ml (float, then double, stays a round trip)
    void cynorm_split_f(double hi, double lo, float* mh, float* ml) noexcept
    void cynorm_split_many(const double* m, float* mh, float* ml, Py_ssize_t n) noexcept
    void cynorm_prefetch(const void* p) noexcept
    enum: CYNORM_LINE_BYTES

cdef extern from "core/sums.h" nogil:
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

# A block whose first element lies more than this many variances ((x[0] - mean)² / var) from
# its mean is summed again, shifted by the mean the first pass gave (block_moments, and
# core/halves.pxi's block_moments_half).
cdef double FAR_SHIFT = 8.0


cdef inline void finish_block(double shift, double s, double q, double inv_n, double* hi,
                              double* lo, double* m2) noexcept nogil:
    """A block's mean (hi + lo) and M2 from its sums s = Σd, q = Σd² of d = x - shift."""
    hi[0] = shift
    lo[0] = s * inv_n
    q = q - s * s * inv_n
    m2[0] = q if not q < 0.0 else 0.0


cdef inline bint far_shift(double lo, double s, double m2) noexcept nogil:
    """Whether finish_block's shift lay more than FAR_SHIFT variances from the block's mean:
    lo·s = n·(mean - shift)², against M2 = n·var.  M2 = q - s²/n then lost up to lo·s / M2
    ulps of itself (q's rounding), and the mean up to |lo| / 2^53.  False for NaN and inf."""
    return lo * s > FAR_SHIFT * m2


cdef inline void block_moments(const floating* x, Py_ssize_t n, double* hi, double* lo,
                               double* m2) noexcept nogil:
    """Mean (hi + lo) and M2 of x[0:n], 0 < n <= BLOCK, in one pass of shifted sums.

    With the shift K = x[0], d = x - K is exact for float32 input (and for float64 input near
    K), and M2 = Σd² - (Σd)²/n loses at most (x[0] - mean)² / var ulps.  Where that is over
    FAR_SHIFT (x[0] an outlier), the block is summed again shifted by the mean just found:
    M2 then within the sums' own rounding, the mean to a few ulps of the standard deviation.
    The sums are in core/sums.h: the one loop GCC does not vectorize well for float64 from
    Cython.
    """
    cdef double shift = x[0], s = 0.0, q = 0.0, inv_n = 1.0 / n
    if floating is float:
        cynorm_shifted_sums_f(NULL, NULL, x, n, shift, &s, &q)
    else:
        cynorm_shifted_sums_d(NULL, NULL, x, n, shift, &s, &q)
    finish_block(shift, s, q, inv_n, hi, lo, m2)
    if not far_shift(lo[0], s, m2[0]):
        return
    shift = hi[0] + lo[0]
    s = 0.0
    q = 0.0
    if floating is float:
        cynorm_shifted_sums_f(NULL, NULL, x, n, shift, &s, &q)
    else:
        cynorm_shifted_sums_d(NULL, NULL, x, n, shift, &s, &q)
    finish_block(shift, s, q, inv_n, hi, lo, m2)


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


cdef inline void square_sum(const floating* x, Py_ssize_t n, double* q) noexcept nogil:
    """q = Σx² of x[0:n] in float64 (the shifted sums with no shift: no cancellation to
    guard against, a sum of positive terms)."""
    cdef double s = 0.0
    if floating is float:
        cynorm_shifted_sums_f(NULL, NULL, x, n, 0.0, &s, q)
    else:
        cynorm_shifted_sums_d(NULL, NULL, x, n, 0.0, &s, q)


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


cdef inline void two_sum(double a, double b, double* s, double* e) noexcept nogil:
    """s = a + b rounded and e its rounding error: s + e = a + b exactly (Knuth)."""
    cdef double t
    s[0] = a + b
    t = s[0] - a
    e[0] = (a - (s[0] - t)) + (b - t)


cdef inline double mean_rest(double shift, double th, double tl, double n, double inv_n,
                             double m) noexcept nogil:
    """(shift + (th + tl) / n) - m to float64: what m, the mean rounded to one float64, leaves
    out of the mean whose sum of differences from shift is th + tl (inv_n = 1 / n).  The
    quotient's remainder th - q·n comes exact from a fused multiply-add (for q within a few
    ulps of th / n it is a multiple of q's ulp below 2n of them); shift - m cancels q exactly."""
    cdef double q = th * inv_n, a, ae
    cdef double r = (fma(-q, n, th) + tl) * inv_n
    two_sum(shift, -m, &a, &ae)
    return ((a + q) + ae) + r


cdef inline void add_part_sum(double* th, double* tl, double s, double s_lo, double count,
                              double shift, double base) noexcept nogil:
    """A part's sum of differences from its own shift, s + s_lo over count elements, added to
    th + tl, a sum of differences from base: s + s_lo + count·(shift - base), in two floats
    (exact while the sums stay within 53 bits, as 16-bit data's do)."""
    cdef double d, dl, p, u, ue, e
    two_sum(shift, -base, &d, &dl)
    p = count * d
    two_sum(p, s, &u, &ue)   # the part's own terms first: one addition on th's chain
    two_sum(th[0], u, th, &e)
    tl[0] += ((fma(count, d, -p) + count * dl) + s_lo + ue) + e


cdef inline void split_mean(double hi, double lo, floating* m_hi, floating* m_lo) noexcept nogil:
    """hi + lo as two numbers of the output dtype (x - m_hi is then exact for x near the mean)."""
    if floating is float:
        cynorm_split_f(hi, lo, m_hi, m_lo)
    else:
        m_hi[0] = hi + lo
        m_lo[0] = (hi - m_hi[0]) + lo


# features whose roots inv_stds takes at a time (a stack array of its callers)
cdef enum:
    ROOT_CHUNK = 64


cdef inline void inv_stds(const floating* var, double scale, double eps, Py_ssize_t n,
                          double* out) noexcept nogil:
    """out[k] = 1 / sqrt(var[k] * scale + eps) for k < n: the per-feature parameters' roots
    and quotients in loops the compiler vectorizes (correctly rounded either way: the scalar
    expression's bits)."""
    cdef Py_ssize_t k
    for k in range(n):
        out[k] = var[k] * scale
    # a loop of its own: the product rounded before eps is added, as the callers' variance is
    # (in one expression the compiler fuses the two into an fma)
    for k in range(n):
        out[k] = 1.0 / sqrt(out[k] + eps)


cdef inline void gx_sums(const floating* g, const floating* w, const floating* x, Py_ssize_t n,
                         double shift, double* sg, double* sgx) noexcept nogil:
    """sg = Σ g·w, sgx = Σ g·w·(x - shift); w may be NULL."""
    if floating is float:
        cynorm_gx_sums_f(g, w, x, n, shift, sg, sgx)
    else:
        cynorm_gx_sums_d(g, w, x, n, shift, sg, sgx)
