# Core: the row normalizer, forward.  LayerNorm and RMSNorm are the same per-row computation
# (ops/layer_norm.pxi and ops/rms_norm.pxi are their entry points), with or without centring:
#
#   centred (LayerNorm):   hi + lo = mean, m2 = Σ(x - mean)²   (the row moments, core/moments.pxi)
#   uncentred (RMSNorm):   hi = lo = 0,    m2 = Σx²            (the float64 sums, square_sum)
#   rstd = 1 / sqrt(m2 / n + eps),   y = ((x - m_hi) - m_lo)·(rstd·w) + b
#
# with the mean as two numbers of the input dtype (split_mean), so that float32 output keeps
# its accuracy far from zero.  A row whose statistics leave the float range is redone scaled
# by a power of two (rescaled_row, on the core's scaled_copy).  Rows longer than PREFETCH_CHUNK
# prefetch the next row while they are written, on large inputs (apply_prefetching); large
# outputs stream (core/stores.pxi).
#
# The residual-add forms (add_layer_norm, add_rms_norm): h = x + residual is made a row at a
# time into a per-thread scratch row (rounded once, in the input dtype), written out as h, and
# normalized from the scratch row, so x and residual are read once and h is never read back
# from memory.  Since each row is read in full before any of its outputs is written, h and y
# may be x or residual themselves (the same elements, row for row).

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
    """A row's y in chunks that start on its lines, each after a prefetch of the same part of
    nxt, the next row (NULL: none), with streaming stores or plain ones.  The next row's
    statistics then read it from the cache while this row is written, instead of waiting on
    memory (streamed) or on the L3 (plain) once y is done (benchmarks/RESULTS.md, items 69 for
    the streamed rows and 70 for the plain ones, from PREFETCH_BYTES)."""
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


cdef inline void row_stats(const floating* x, Py_ssize_t n, bint centred, double* hi,
                           double* lo, double* m2) noexcept nogil:
    """The statistics of one row: its moments (centred), or mean 0 and Σx² (uncentred)."""
    if centred:
        row_moments(x, n, hi, lo, m2)
    else:
        hi[0] = 0.0
        lo[0] = 0.0
        square_sum(x, n, m2)


cdef inline void norm_row(const floating* x, floating* y, Py_ssize_t n, const floating* w,
                          const floating* b, double eps, bint centred, double* mean_out,
                          double* rstd_out, bint stream, const floating* nxt=NULL) noexcept nogil:
    cdef double hi = 0.0, lo = 0.0, m2 = 0.0
    row_stats(x, n, centred, &hi, &lo, &m2)
    norm_finish(x, y, n, w, b, eps, centred, hi, lo, m2, 1.0 / sqrt(m2 / n + eps), mean_out,
                rstd_out, stream, nxt)


cdef inline void norm_finish(const floating* x, floating* y, Py_ssize_t n, const floating* w,
                             const floating* b, double eps, bint centred, double hi, double lo,
                             double m2, double rstd, double* mean_out, double* rstd_out,
                             bint stream, const floating* nxt=NULL) noexcept nogil:
    """The rest of a row once its statistics (and rstd = 1 / sqrt(m2 / n + eps)) are known
    (nxt: the next row, prefetched while this one is written; mean_out NULL: not kept)."""
    cdef floating mh, ml, rs
    if row_scale(x, y, n, w, b, eps, centred, hi, lo, m2, rstd, mean_out, rstd_out, stream,
                 &mh, &ml, &rs):
        return
    if stream or nxt != NULL:
        apply_prefetching(x, y, n, mh, ml, rs, w, b, nxt, stream)
    else:
        apply_plain(x, y, n, mh, ml, rs, w, b)


cdef inline bint f32_rescaled(double m2, Py_ssize_t n, double eps) noexcept nogil:
    """Whether row_scale redoes a float32 row of n elements and these statistics scaled:
    deviations near FLT_MAX would overflow x - mean in float32, or 1 / std would."""
    return not m2 <= F32_BIG_M2 or (m2 > 0.0 and m2 / n + eps < F32_TINY_VAR)


cdef inline bint row_scale(const floating* x, floating* y, Py_ssize_t n, const floating* w,
                           const floating* b, double eps, bint centred, double hi, double lo,
                           double m2, double rstd, double* mean_out, double* rstd_out,
                           bint stream, floating* mh, floating* ml, floating* rs) noexcept nogil:
    """A row's statistics kept, and its mean (mh + ml) and rstd (rs) as the output takes them;
    or 1 when the row's statistics left the float range and the row was redone (y written)
    scaled by a power of two."""
    cdef bint rescale
    if floating is float:
        rescale = f32_rescaled(m2, n, eps)
    else:
        # squares overflowed float64 (|x| near 1e154 or more), or underflowed (subnormal
        # spreads) with no eps to hide it
        rescale = not isfinite(m2) or (m2 < TINY_M2 and eps < TINY_M2 and m2 > 0.0) or (
            m2 == 0.0 and eps == 0.0)
    if rescale and rescaled_row(x, y, n, w, b, eps, centred, mean_out, rstd_out, stream):
        return 1
    if not isfinite(m2) and (centred or m2 != m2):
        # inf or NaN in the row itself: NaN out, never silent zeros (uncentred, an inf with no
        # NaN gives rstd = 0, torch's result: 0 for the finite elements, NaN for the inf)
        rstd = NAN
    if mean_out != NULL:
        mean_out[0] = hi + lo
    if rstd_out != NULL:
        rstd_out[0] = rstd
    split_mean(hi, lo, mh, ml)
    rs[0] = <floating>rstd
    return 0


cdef int rescaled_row(const floating* x, floating* y, Py_ssize_t n, const floating* w,
                      const floating* b, double eps, bint centred, double* mean_out,
                      double* rstd_out, bint stream) noexcept nogil:
    """The row normalized from x times 2^k (the core's scaled_copy) with eps times 2^2k: the
    output is the same, the statistics are scaled back.  0 (nothing done) where scaled_copy
    has nothing to do."""
    cdef int k = 0
    cdef floating* buf = scaled_copy(x, n, &k)
    if buf == NULL:
        return 0
    norm_row(<const floating*>buf, y, n, w, b, ldexp(eps, 2 * k), centred, mean_out, rstd_out,
             stream)
    free(buf)
    if mean_out != NULL:
        mean_out[0] = ldexp(mean_out[0], -k)
    if rstd_out != NULL:
        rstd_out[0] = ldexp(rstd_out[0], k)
    return 1


cdef inline const floating* residual_row(const floating* x, const floating* r, floating* h,
                                         floating* tmp, Py_ssize_t n,
                                         bint stream) noexcept nogil:
    """tmp = x + r (rounded once), written to h as well; returns tmp, the row to normalize."""
    cdef Py_ssize_t j
    for j in range(n):
        tmp[j] = x[j] + r[j]
    if stream:
        if floating is float:
            cynorm_copy_nt_f(tmp, h, n)
        else:
            cynorm_copy_nt_d(tmp, h, n)
    else:
        memcpy(h, tmp, n * sizeof(floating))
    return tmp


cdef void norm_rows(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                    Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D, const floating* w,
                    const floating* b, double eps, bint centred, double* mean, double* rstd,
                    const unsigned char* mask, bint write_padding, bint stream, bint prefetch,
                    const floating* res, Py_ssize_t ldr, floating* h, Py_ssize_t ldh,
                    floating* tmp) noexcept nogil:
    # padding rows (mask 0) are not computed: written as 0 (or left alone when y is known to
    # hold zeros already), their statistics left alone; prefetch: long rows prefetch the next
    # one while they are written (apply_prefetching).  res (NULL: none): the residual, h = x +
    # res is written for every row, padding too, through tmp (SHORT_ROWS rows of D).
    cdef Py_ssize_t i, e, k
    cdef double hi[SHORT_ROWS]
    cdef double lo[SHORT_ROWS]
    cdef double m2[SHORT_ROWS]
    cdef double rs[SHORT_ROWS]
    cdef const floating* src[SHORT_ROWS]
    if D > SHORT_ROW:
        for i in range(r0, r1):
            src[0] = x + i * ldx
            if res != NULL:
                src[0] = residual_row(src[0], res + i * ldr, h + i * ldh, tmp, D, stream)
            if mask != NULL and not mask[i]:
                if write_padding:
                    zero_row(y + i * ldy, D, stream)
                continue
            norm_row(src[0], y + i * ldy, D, w, b, eps, centred,
                     mean + i if mean != NULL else NULL, rstd + i if rstd != NULL else NULL,
                     stream, x + (i + 1) * ldx if prefetch and i + 1 < r1 and res == NULL
                     else NULL)
    else:
        # short rows, a few at a time: their statistics, then the divisions and square roots
        # together (one vector instruction instead of a latency chain per row), then the rest
        i = r0
        while i < r1:
            e = i + SHORT_ROWS if i + SHORT_ROWS < r1 else r1
            for k in range(e - i):
                hi[k] = 0.0
                lo[k] = 0.0
                m2[k] = 0.0
                src[k] = x + (i + k) * ldx
                if res != NULL:
                    src[k] = residual_row(src[k], res + (i + k) * ldr, h + (i + k) * ldh,
                                          tmp + k * D, D, stream)
                if mask == NULL or mask[i + k]:
                    row_stats(src[k], D, centred, &hi[k], &lo[k], &m2[k])
            for k in range(SHORT_ROWS):
                rs[k] = 1.0 / sqrt(m2[k] / D + eps)
            for k in range(e - i):
                if mask != NULL and not mask[i + k]:
                    if write_padding:
                        zero_row(y + (i + k) * ldy, D, stream)
                    continue
                norm_finish(src[k], y + (i + k) * ldy, D, w, b, eps, centred, hi[k], lo[k],
                            m2[k], rs[k], mean + i + k if mean != NULL else NULL,
                            rstd + i + k if rstd != NULL else NULL, stream)
            i = e
    if stream:
        cynorm_sfence()


cdef void _norm(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy, Py_ssize_t M,
                Py_ssize_t D, const floating* w, const floating* b, double* mean, double* rstd,
                double eps, bint centred, const unsigned char* mask, bint write_padding,
                const floating* res, Py_ssize_t ldr, floating* h, Py_ssize_t ldh,
                floating* tmp, int n_threads) noexcept nogil:
    # tmp: n_threads scratch blocks of SHORT_ROWS rows of D (NULL without res)
    cdef Py_ssize_t t, nbytes = M * D * <Py_ssize_t>sizeof(floating)
    cdef bint stream, prefetch
    if res != NULL:
        nbytes *= 2   # h and y
    stream = streamed(nbytes, n_threads)
    prefetch = stream or nbytes >= PREFETCH_BYTES
    if n_threads <= 1:
        norm_rows(x, ldx, y, ldy, 0, M, D, w, b, eps, centred, mean, rstd, mask, write_padding,
                  stream, prefetch, res, ldr, h, ldh, tmp)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        norm_rows(x, ldx, y, ldy, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), D, w, b,
                  eps, centred, mean, rstd, mask, write_padding, stream, prefetch, res, ldr, h,
                  ldh, tmp + t * SHORT_ROWS * D if tmp != NULL else NULL)


cdef run_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight, cnp.ndarray bias,
              cnp.ndarray mean, cnp.ndarray rstd, double eps, int n_threads, cnp.ndarray mask,
              bint write_padding, bint centred, cnp.ndarray residual, cnp.ndarray h):
    """The entry points' common part (layer_norm, rms_norm): the arrays' last checks, then one
    dispatch on the dtype.  residual and h: both or neither (h = x + residual, written)."""
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef const unsigned char* mk = mask_data(mask, M)
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldy = row_stride(y, M, D, True)
    cdef Py_ssize_t ldr = 0, ldh = 0
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef void* b = optional_data(bias, D, f32)
    cdef double* mp = float64_data(mean, M)
    cdef double* rp = float64_data(rstd, M)
    cdef void* rd = NULL
    cdef void* hd = NULL
    cdef void* tmp = NULL
    cdef int T = max(1, n_threads)
    if is_float32(y) != f32:
        raise TypeError("x and y must have the same dtype")
    if (residual is None) != (h is None):
        raise ValueError("residual and h go together")
    if residual is not None:
        ldr = row_stride(residual, M, D, False)
        ldh = row_stride(h, M, D, True)
        if is_float32(residual) != f32 or is_float32(h) != f32:
            raise TypeError("x, residual and h must have the same dtype")
        rd = cnp.PyArray_DATA(residual)
        hd = cnp.PyArray_DATA(h)
    if M == 0:
        return
    if rd != NULL:
        tmp = malloc(T * SHORT_ROWS * D * (4 if f32 else 8))
        if tmp == NULL:
            raise MemoryError()
    try:
        with nogil:
            if f32:
                _norm(<const float*>cnp.PyArray_DATA(x), ldx, <float*>cnp.PyArray_DATA(y), ldy,
                      M, D, <const float*>w, <const float*>b, mp, rp, eps, centred, mk,
                      write_padding, <const float*>rd, ldr, <float*>hd, ldh, <float*>tmp, T)
            else:
                _norm(<const double*>cnp.PyArray_DATA(x), ldx, <double*>cnp.PyArray_DATA(y),
                      ldy, M, D, <const double*>w, <const double*>b, mp, rp, eps, centred, mk,
                      write_padding, <const double*>rd, ldr, <double*>hd, ldh, <double*>tmp, T)
    finally:
        free(tmp)
