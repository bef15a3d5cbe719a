# Core: the row normalizer, backward (LayerNorm and RMSNorm; ops/layer_norm.pxi and
# ops/rms_norm.pxi are the entry points).  Per row of n elements with x̂ = (x - mean)·rstd and
# g' = g·w (mean 0 for the uncentred RMSNorm):
#     dx = rstd·(g' - mean(g') - x̂·mean(g'·x̂))     centred (LayerNorm)
#     dx = rstd·g' - x̂·rstd·mean(g'·x̂)            uncentred (RMSNorm: no mean(g') term)
#     dw += g·x̂, db += g            (per-thread partial sums, added up at the end)
# plus, for the residual-add forms, the gradient gr that reaches h from the residual stream,
# added to the row's dx while it is in cache (a padding row's dx is gr itself).
# Gradients are accumulated in float64 and written in the input dtype; the saved statistics
# arrive as float64 and are never recomputed.  The float32 sweeps are in core/rows_backward.h.

cdef extern from "core/rows_backward.h" nogil:
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

cdef void norm_param_grads(const floating* g, Py_ssize_t ldg, const floating* x,
                                 Py_ssize_t ldx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D,
                                 const double* mean, const double* rstd, double* dw, double* db,
                                 const unsigned char* mask) noexcept nogil:
    """dw += Σ g·x̂ and db += Σ g over the rows r0..r1 the mask keeps (dw or db may be NULL),
    four rows per sweep.  float32 rows come here only one at a time (masked rows) or as the
    up to three rows the four-row sweep of norm_backward_rows leaves over."""
    cdef Py_ssize_t i = r0, j, k
    cdef const floating* gr[4]
    cdef const floating* xr[4]
    cdef floating mh[4]
    cdef floating ml[4]
    cdef floating rs[4]
    if mask != NULL:
        # rows the mask keeps, one at a time (padding is skipped where it lies)
        for i in range(r0, r1):
            if mask[i]:
                norm_param_grads(g, ldg, x, ldx, i, i + 1, D, mean, rstd, dw, db, NULL)
        return
    while i < r1:
        if i + 4 <= r1:
            for k in range(4):
                gr[k] = g + (i + k) * ldg
                xr[k] = x + (i + k) * ldx
                split_mean(mean[i + k] if mean != NULL else 0.0, 0.0, &mh[k], &ml[k])
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
            split_mean(mean[i] if mean != NULL else 0.0, 0.0, &mh[0], &ml[0])
            rs[0] = <floating>rstd[i]
            if dw != NULL:
                for j in range(D):
                    dw[j] += gr[0][j] * (((xr[0][j] - mh[0]) - ml[0]) * rs[0])
            if db != NULL:
                for j in range(D):
                    db[j] += gr[0][j]
            i += 1


cdef inline void dx_coefs(double rs, double sg, double sgx, Py_ssize_t D, bint centred,
                          floating* af, floating* cf) noexcept nogil:
    """A row's dx coefficients from its two sums (sg = Σ g', sgx = Σ g'·(x - mean)):
    dx = rstd·(g' - af) - cf·(x - mean), af = mean(g') (0 uncentred), cf = rstd³·sgx / D.
    The one home of these lines: the float32 and 16-bit sweeps take them from here."""
    af[0] = <floating>(sg / D) if centred else 0.0
    cf[0] = <floating>(rs * rs * rs * sgx / D)


cdef inline void add_row(floating* dx, const floating* gr, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        dx[j] = dx[j] + gr[j]


cdef void norm_backward_rows(const floating* g, Py_ssize_t ldg, const floating* x,
                             Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t r0,
                             Py_ssize_t r1, Py_ssize_t D, const floating* w,
                             const double* mean, const double* rstd, double* dw, double* db,
                             const unsigned char* mask, bint stream, bint centred,
                             const floating* gr, Py_ssize_t ldgr) noexcept nogil:
    """Rows r0..r1: per row the two sums of core/sums.h, then one pass writing dx, and the
    parameter gradients (dw, db may be NULL) every four rows while they are in cache; float32
    without a mask: four rows' sums, then one sweep writing their dx (streaming stores with
    stream) and parameter gradients.
    x - mean is (x - m_hi) - m_lo in the input dtype (mean NULL: 0).  Rows the mask marks as
    padding get dx = 0 (gr: their gr) and add nothing to dw and db.  gr (NULL: none) is added
    to each row's dx once it is written (the sweeps then take plain stores)."""
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
    if gr != NULL:
        stream = False
    if floating is float and mask == NULL:
        while r0 + 4 <= r1:
            for k in range(4):
                g4[k] = g + (r0 + k) * ldg
                x4[k] = x + (r0 + k) * ldx
                dx4[k] = dx + (r0 + k) * lddx
                rs = rstd[r0 + k]
                split_mean(mean[r0 + k] if mean != NULL else 0.0, 0.0, &mh4[k], &ml4[k])
                rs4[k] = <float>rs
                # (asking for the same row of the next four meanwhile)
                cynorm_ln_gx_sums_f(g4[k], w, x4[k], D, mh4[k], ml4[k], &sg, &sgx, 4 * ldg,
                                    4 * ldx)
                dx_coefs(rs, sg, sgx, D, centred, &af4[k], &cf4[k])
            cynorm_ln_paramgrads4_f(g4, x4, mh4, ml4, rs4, dw, db, D, w, af4, cf4, dx4, stream)
            if gr != NULL:
                for k in range(4):
                    add_row(dx4[k], gr + (r0 + k) * ldgr, D)
            r0 += 4
        if stream:
            cynorm_sfence()
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            if gr != NULL:
                memcpy(dx + i * lddx, gr + i * ldgr, D * sizeof(floating))
            else:
                zero_row(dx + i * lddx, D)
        else:
            gi = g + i * ldg
            xi = x + i * ldx
            dxi = dx + i * lddx
            m = mean[i] if mean != NULL else 0.0
            rs = rstd[i]
            split_mean(m, 0.0, &mh, &ml)
            rsf = <floating>rs
            if floating is float:
                cynorm_ln_gx_sums_f(gi, w, xi, D, mh, ml, &sg, &sgx, 0, 0)
            else:
                gx_sums(gi, w, xi, D, m, &sg, &sgx)
            dx_coefs(rs, sg, sgx, D, centred, &af, &cf)
            if floating is float:   # the arithmetic of the four-row sweeps, to the bit
                cynorm_ln_dx_row_f(gi, w, xi, dxi, D, mh, ml, rsf, af, cf)
            elif w != NULL:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] * w[j] - af) - cf * ((xi[j] - mh) - ml)
            else:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] - af) - cf * ((xi[j] - mh) - ml)
            if gr != NULL:
                add_row(dxi, gr + i * ldgr, D)
        if (dw != NULL or db != NULL) and ((i - r0) % 4 == 3 or i == r1 - 1):
            # the parameter gradients of the last four rows, while they are in cache
            i0 = i - (i - r0) % 4
            norm_param_grads(g, ldg, x, ldx, i0, i + 1, D, mean, rstd, dw, db, mask)


cdef void _norm_backward(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                         floating* dx, Py_ssize_t lddx, Py_ssize_t M, Py_ssize_t D,
                         const floating* w, const double* mean, const double* rstd, double* dw,
                         double* db, const unsigned char* mask, bint centred,
                         const floating* gr, Py_ssize_t ldgr, int T,
                         Py_ssize_t P) noexcept nogil:
    # dw, db: T rows of D, P apart (or NULL), one per thread
    cdef Py_ssize_t t
    cdef bint stream = streamed(M * D * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        norm_backward_rows(g, ldg, x, ldx, dx, lddx, 0, M, D, w, mean, rstd, dw, db, mask,
                           stream, centred, gr, ldgr)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        norm_backward_rows(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T), D, w,
                           mean, rstd, dw + t * P if dw != NULL else NULL,
                           db + t * P if db != NULL else NULL, mask, stream, centred, gr, ldgr)


cdef run_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                       cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                       cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                       cnp.ndarray mask, bint centred, cnp.ndarray grad_residual):
    """The backward entry points' common part: the arrays' last checks, the per-thread partial
    sums, one dispatch on the dtype.  mean None: the uncentred form (RMSNorm)."""
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldg = row_stride(g, M, D, False)
    cdef Py_ssize_t lddx = row_stride(dx, M, D, True), ldgr = 0
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef double* mp = float64_data(mean, M, False)
    cdef double* rp = float64_data(rstd, M, False)
    cdef void* gw = optional_data(grad_weight, D, f32)
    cdef void* gb = optional_data(grad_bias, D, f32)
    cdef void* grp = NULL
    cdef int T = max(1, n_threads)
    cdef double* parts = NULL
    cdef double* dw = NULL
    cdef double* db = NULL
    cdef void* block = NULL
    cdef Py_ssize_t P = part_stride(D)
    cdef const unsigned char* mk = mask_data(mask, M)
    if (is_float32(g) != f32 or is_float32(dx) != f32 or rp == NULL
            or (centred and mp == NULL)):
        raise TypeError("backward: inconsistent arrays")
    if grad_residual is not None:
        ldgr = row_stride(grad_residual, M, D, False)
        if is_float32(grad_residual) != f32:
            raise TypeError("grad_residual must have x's dtype")
        grp = cnp.PyArray_DATA(grad_residual)
    if not centred:
        mp = NULL
    if gw != NULL or gb != NULL:
        # per-thread partial sums (zeroed), T rows of D (P apart: whole lines) for each
        parts = aligned_parts(&block, 2 * T * P + 1)
        if parts == NULL:
            raise MemoryError()
        dw = parts if gw != NULL else NULL
        db = parts + T * P if gb != NULL else NULL
    try:
        with nogil:
            if f32:
                if M > 0:
                    _norm_backward(<const float*>cnp.PyArray_DATA(g), ldg,
                                   <const float*>cnp.PyArray_DATA(x), ldx,
                                   <float*>cnp.PyArray_DATA(dx), lddx, M, D, <const float*>w,
                                   mp, rp, dw, db, mk, centred, <const float*>grp, ldgr, T, P)
                sum_parts(dw, T, D, <float*>gw, P)
                sum_parts(db, T, D, <float*>gb, P)
            else:
                if M > 0:
                    _norm_backward(<const double*>cnp.PyArray_DATA(g), ldg,
                                   <const double*>cnp.PyArray_DATA(x), ldx,
                                   <double*>cnp.PyArray_DATA(dx), lddx, M, D, <const double*>w,
                                   mp, rp, dw, db, mk, centred, <const double*>grp, ldgr, T, P)
                sum_parts(dw, T, D, <double*>gw, P)
                sum_parts(db, T, D, <double*>gb, P)
    finally:
        free(block)
