# LayerNorm, forward and backward.
#
# Forward, per row: its moments (core/moments.pxi), then y = ((x - m_hi) - m_lo)·rstd·w + b
# with the mean as two numbers of the input dtype, so that float32 output keeps its accuracy
# far from zero; a row whose statistics leave the float range is redone scaled
# (rescaled_row).  Rows longer than PREFETCH_CHUNK prefetch the next row while they are
# written, on large inputs (apply_prefetching); large outputs stream (core/stores.pxi).
#
# Backward, per row of n elements with x̂ = (x - mean)·rstd and g' = g·w:
#     dx = rstd·(g' - mean(g') - x̂·mean(g'·x̂))
#     dw += g·x̂, db += g            (per-thread partial sums, added up at the end)
# Gradients are accumulated in float64 and written in the input dtype; the saved statistics
# arrive as float64 and are never recomputed.  The float32 sweeps are in ops/layer_norm.h.

cdef extern from "ops/layer_norm.h" nogil:
    void cynorm_ln_paramgrads4_f(const float** g, const float** x, const float* mh,
                                 const float* ml, const float* rs, double* dw, double* db,
                                 Py_ssize_t D, const float* w, const float* af,
                                 const float* cf, float** dx, int nt) noexcept
    void cynorm_ln_dx_row_f(const float* g, const float* w, const float* x, float* dx,
                            Py_ssize_t n, float mh, float ml, float rs, float af,
                            float cf) noexcept
    void cynorm_ln_gx_sums_f(const float* g, const float* w, const float* x, Py_ssize_t n,
                             float mh, float ml, double* sg, double* sgx, Py_ssize_t ahead_g,
                             Py_ssize_t ahead_x) noexcept

cdef inline void layer_norm_row(const floating* x, floating* y, Py_ssize_t n,
                                const floating* w, const floating* b, double eps,
                                double* mean_out, double* rstd_out,
                                bint stream=False, const floating* nxt=NULL) noexcept nogil:
    cdef double hi = 0.0, lo = 0.0, m2 = 0.0
    row_moments(x, n, &hi, &lo, &m2)
    layer_norm_finish(x, y, n, w, b, eps, hi, lo, m2, 1.0 / sqrt(m2 / n + eps), mean_out,
                      rstd_out, stream, nxt)


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
    on memory (streamed) or on the L3 (plain) once y is done (benchmarks/RESULTS.md, items 69
    for the streamed rows and 70 for the plain ones, from PREFETCH_BYTES)."""
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


cdef void layer_norm_param_grads(const floating* g, Py_ssize_t ldg, const floating* x,
                                 Py_ssize_t ldx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D,
                                 const double* mean, const double* rstd, double* dw, double* db,
                                 const unsigned char* mask) noexcept nogil:
    """dw += Σ g·x̂ and db += Σ g over the rows r0..r1 the mask keeps (dw or db may be NULL),
    four rows per sweep.  float32 rows come here only one at a time (masked rows) or as the
    up to three rows the four-row sweep of layer_norm_backward_rows leaves over."""
    cdef Py_ssize_t i = r0, j, k, idx[4]
    cdef const floating* gr[4]
    cdef const floating* xr[4]
    cdef floating mh[4]
    cdef floating ml[4]
    cdef floating rs[4]
    if mask != NULL:
        # rows the mask keeps, one at a time (padding is skipped where it lies)
        for i in range(r0, r1):
            if mask[i]:
                layer_norm_param_grads(g, ldg, x, ldx, i, i + 1, D, mean, rstd, dw, db, NULL)
        return
    while i < r1:
        if i + 4 <= r1:
            for k in range(4):
                gr[k] = g + (i + k) * ldg
                xr[k] = x + (i + k) * ldx
                split_mean(mean[i + k], 0.0, &mh[k], &ml[k])
                rs[k] = <floating>rstd[i + k]
            if dw != NULL:
                for j in range(D):
                    dw[j] += ((gr[0][j] * (((xr[0][j] - mh[0]) - ml[0]) * rs[0])
                               + gr[1][j] * (((xr[1][j] - mh[1]) - ml[1]) * rs[1]))
                              + (gr[2][j] * (((xr[2][j] - mh[2]) - ml[2]) * rs[2])
                                 + gr[3][j] * (((xr[3][j] - mh[3]) - ml[3]) * rs[3])))
            if db != NULL:
                for j in range(D):
                    db[j] += (<double>gr[0][j] + <double>gr[1][j]) + (<double>gr[2][j]
                                                                      + <double>gr[3][j])
            i += 4
        else:
            gr[0] = g + i * ldg
            xr[0] = x + i * ldx
            split_mean(mean[i], 0.0, &mh[0], &ml[0])
            rs[0] = <floating>rstd[i]
            if dw != NULL:
                for j in range(D):
                    dw[j] += gr[0][j] * (((xr[0][j] - mh[0]) - ml[0]) * rs[0])
            if db != NULL:
                for j in range(D):
                    db[j] += gr[0][j]
            i += 1


cdef void layer_norm_backward_rows(const floating* g, Py_ssize_t ldg, const floating* x,
                                   Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t r0,
                                   Py_ssize_t r1, Py_ssize_t D, const floating* w,
                                   const double* mean, const double* rstd, double* dw,
                                   double* db, const unsigned char* mask,
                                   bint stream) noexcept nogil:
    """Rows r0..r1: per row the two sums of core/sums.h, then one pass writing dx, and the
    parameter gradients (dw, db may be NULL) every four rows while they are in cache; float32
    without a mask: four rows' sums, then one sweep writing their dx (streaming stores with
    stream) and parameter gradients.
    x - mean is (x - m_hi) - m_lo in the input dtype.  Rows the mask marks as padding get
    dx = 0 and add nothing to dw and db."""
    cdef Py_ssize_t i, j, k, i0, i1
    cdef const floating* gi
    cdef const floating* xi
    cdef floating* dxi
    cdef double m, rs, sg = 0.0, sgx = 0.0
    cdef floating mh, ml, rsf, af, cf
    cdef const float* g4[4]
    cdef const float* x4[4]
    cdef float* dx4[4]
    cdef float mh4[4]
    cdef float ml4[4]
    cdef float rs4[4]
    cdef float af4[4]
    cdef float cf4[4]
    if floating is float and mask == NULL:
        while r0 + 4 <= r1:
            for k in range(4):
                g4[k] = g + (r0 + k) * ldg
                x4[k] = x + (r0 + k) * ldx
                dx4[k] = dx + (r0 + k) * lddx
                rs = rstd[r0 + k]
                split_mean(mean[r0 + k], 0.0, &mh4[k], &ml4[k])
                rs4[k] = <float>rs
                # (asking for the same row of the next four meanwhile)
                cynorm_ln_gx_sums_f(g4[k], w, x4[k], D, mh4[k], ml4[k], &sg, &sgx, 4 * ldg,
                                    4 * ldx)
                af4[k] = <float>(sg / D)
                cf4[k] = <float>(rs * rs * rs * sgx / D)
            cynorm_ln_paramgrads4_f(g4, x4, mh4, ml4, rs4, dw, db, D, w, af4, cf4, dx4, stream)
            r0 += 4
        if stream:
            cynorm_sfence()
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            zero_row(dx + i * lddx, D)
        else:
            gi = g + i * ldg
            xi = x + i * ldx
            dxi = dx + i * lddx
            m = mean[i]
            rs = rstd[i]
            split_mean(m, 0.0, &mh, &ml)
            rsf = <floating>rs
            if floating is float:
                cynorm_ln_gx_sums_f(gi, w, xi, D, mh, ml, &sg, &sgx, 0, 0)
            else:
                gx_sums(gi, w, xi, D, m, &sg, &sgx)
            af = <floating>(sg / D)
            cf = <floating>(rs * rs * rs * sgx / D)
            if floating is float:   # the arithmetic of the four-row sweeps, to the bit
                cynorm_ln_dx_row_f(gi, w, xi, dxi, D, mh, ml, rsf, af, cf)
            elif w != NULL:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] * w[j] - af) - cf * ((xi[j] - mh) - ml)
            else:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] - af) - cf * ((xi[j] - mh) - ml)
        if (dw != NULL or db != NULL) and ((i - r0) % 4 == 3 or i == r1 - 1):
            # the parameter gradients of the last four rows, while they are in cache
            i0 = i - (i - r0) % 4
            layer_norm_param_grads(g, ldg, x, ldx, i0, i + 1, D, mean, rstd, dw, db, mask)


cdef void _layer_norm_backward(const floating* g, Py_ssize_t ldg, const floating* x,
                               Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t M,
                               Py_ssize_t D, const floating* w, const double* mean,
                               const double* rstd, double* dw, double* db,
                               const unsigned char* mask, int T) noexcept nogil:
    # dw, db: T rows of D (or NULL), one per thread
    cdef Py_ssize_t t
    cdef bint stream = streamed(M * D * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, 0, M, D, w, mean, rstd, dw, db,
                                 mask, stream)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T),
                                 D, w, mean, rstd, dw + t * D if dw != NULL else NULL,
                                 db + t * D if db != NULL else NULL, mask, stream)


def layer_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                        cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                        cnp.ndarray mask=None):
    """dx from grad_out g and input x (same dtype, rows of D elements) and the saved float64
    mean and rstd (one per row); weight: D elements of x's dtype or None.

    grad_weight, grad_bias: D elements of x's dtype that receive Σ g·x̂ and Σ g over the rows,
    or None: summed in float64, per thread, then the threads' sums in order.
    """
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldg = row_stride(g, M, D, False)
    cdef Py_ssize_t lddx = row_stride(dx, M, D, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef double* mp = float64_data(mean, M, False)
    cdef double* rp = float64_data(rstd, M, False)
    cdef void* gw = optional_data(grad_weight, D, f32)
    cdef void* gb = optional_data(grad_bias, D, f32)
    cdef int T = max(1, n_threads)
    cdef double* parts = NULL
    cdef double* dw = NULL
    cdef double* db = NULL
    cdef const unsigned char* mk = mask_data(mask, M)
    if is_float32(g) != f32 or is_float32(dx) != f32 or mp == NULL or rp == NULL:
        raise TypeError("layer_norm_backward: inconsistent arrays")
    if gw != NULL or gb != NULL:
        # per-thread partial sums (zeroed), T rows of D for each gradient
        parts = <double*>calloc(2 * T * D + 1, sizeof(double))
        if parts == NULL:
            raise MemoryError()
        dw = parts if gw != NULL else NULL
        db = parts + T * D if gb != NULL else NULL
    try:
        with nogil:
            if f32:
                if M > 0:
                    _layer_norm_backward(<const float*>cnp.PyArray_DATA(g), ldg,
                                         <const float*>cnp.PyArray_DATA(x), ldx,
                                         <float*>cnp.PyArray_DATA(dx), lddx, M, D,
                                         <const float*>w, mp, rp, dw, db, mk, T)
                sum_parts(dw, T, D, <float*>gw)
                sum_parts(db, T, D, <float*>gb)
            else:
                if M > 0:
                    _layer_norm_backward(<const double*>cnp.PyArray_DATA(g), ldg,
                                         <const double*>cnp.PyArray_DATA(x), ldx,
                                         <double*>cnp.PyArray_DATA(dx), lddx, M, D,
                                         <const double*>w, mp, rp, dw, db, mk, T)
                sum_parts(dw, T, D, <double*>gw)
                sum_parts(db, T, D, <double*>gb)
    finally:
        free(parts)
