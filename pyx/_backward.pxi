# Backward kernels of LayerNorm and BatchNorm, included by every kernels module after
# _kernels_impl.pxi (whose helpers they use: chunk, row_stride, is_float32, optional_data, ...).
#
# Gradients are accumulated in float64 and written in the input dtype.  The statistics saved by
# the forward pass (mean, rstd / invstd) arrive as float64 and are never recomputed here.
#
# LayerNorm, per row of n elements with x̂ = (x - mean)·rstd and g' = g·w:
#     dx = rstd·(g' - mean(g') - x̂·mean(g'·x̂))
#     dw += g·x̂, db += g            (per-thread partial sums, added up at the end)
# BatchNorm, per feature over its n elements:
#     training: dx = w·invstd·(g - Σg/n - (x - mean)·invstd²·Σg(x - mean)/n)
#     eval:     dx = w·invstd·g      (the running statistics are constants)
#     dw = invstd·Σg(x - mean), db = Σg


cdef inline void gx_sums(const floating* g, const floating* x, Py_ssize_t n, double shift,
                         double* sg, double* sgx) noexcept nogil:
    if floating is float:
        cynorm_gx_sums_f(g, x, n, shift, sg, sgx)
    else:
        cynorm_gx_sums_d(g, x, n, shift, sg, sgx)


cdef void layer_norm_backward_rows(const floating* g, Py_ssize_t ldg, const floating* x,
                                   Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t r0,
                                   Py_ssize_t r1, Py_ssize_t D, const floating* w,
                                   const double* mean, const double* rstd, floating* gw,
                                   double* dw, double* db) noexcept nogil:
    """Rows r0..r1; gw is a scratch row of D elements; dw, db (D,) accumulate (or are NULL)."""
    cdef Py_ssize_t i, j
    cdef const floating* gi
    cdef const floating* xi
    cdef const floating* gp
    cdef floating* dxi
    cdef double m, rs, sg = 0.0, sgx = 0.0, a, c
    for i in range(r0, r1):
        gi = g + i * ldg
        xi = x + i * ldx
        dxi = dx + i * lddx
        m = mean[i]
        rs = rstd[i]
        if dw != NULL:
            for j in range(D):
                dw[j] += gi[j] * ((<double>xi[j] - m) * rs)
        if db != NULL:
            for j in range(D):
                db[j] += gi[j]
        if w != NULL:
            for j in range(D):
                gw[j] = gi[j] * w[j]
            gp = gw
        else:
            gp = gi
        gx_sums(gp, xi, D, m, &sg, &sgx)
        a = sg / D
        c = rs * rs * rs * sgx / D
        for j in range(D):
            dxi[j] = <floating>(rs * (gp[j] - a) - c * (<double>xi[j] - m))


cdef inline void bn_backward_row(const floating* g, const floating* x, floating* dx,
                                 Py_ssize_t n, const double* coef) noexcept nogil:
    # coef: mean, k1, k2, k3 of one feature: dx = k1·g + k2·(x - mean) + k3
    cdef Py_ssize_t j
    cdef double m = coef[0], k1 = coef[1], k2 = coef[2], k3 = coef[3]
    for j in range(n):
        dx[j] = <floating>(k1 * g[j] + k2 * (<double>x[j] - m) + k3)


cdef inline void bn_backward_vector(const floating* g, const floating* x, floating* dx,
                                    Py_ssize_t n, const double* mean, const double* k1,
                                    const double* k2, const double* k3) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        dx[j] = <floating>(k1[j] * g[j] + k2[j] * (<double>x[j] - mean[j]) + k3[j])


cdef void bn_sums_rows(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L, Py_ssize_t C,
                       const double* mean, double* parts) noexcept nogil:
    """Σg and Σg·(x - mean) of rows r0..r1 (row i: feature i % C) into parts[2i], parts[2i+1]."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        gx_sums(g + i * ldg, x + i * ldx, L, mean[i % C], &parts[2 * i], &parts[2 * i + 1])


cdef void bn_sums_columns(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F, const double* mean_col,
                          double* sg, double* sgx) noexcept nogil:
    """sg[f] = Σg, sgx[f] = Σg·(x - mean_col[f]) down the columns of rows r0..r1."""
    cdef Py_ssize_t i, f
    cdef const floating* gi
    cdef const floating* xi
    for f in range(F):
        sg[f] = 0.0
        sgx[f] = 0.0
    for i in range(r0, r1):
        gi = g + i * ldg
        xi = x + i * ldx
        for f in range(F):
            sg[f] += gi[f]
            sgx[f] += gi[f] * (<double>xi[f] - mean_col[f])


cdef void bn_dx_range(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                      floating* dx, Py_ssize_t lddx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t N,
                      Py_ssize_t C, bint by_rows, const double* coef,
                      const double* coef_col) noexcept nogil:
    """dx of rows r0..r1.  coef (4, C) per feature; coef_col (4, N) per column (column path)."""
    cdef Py_ssize_t i, c, L = N // C
    cdef double one[4]
    for i in range(r0, r1):
        if by_rows:
            c = i % C
            one[0] = coef[c]
            one[1] = coef[C + c]
            one[2] = coef[2 * C + c]
            one[3] = coef[3 * C + c]
            bn_backward_row(g + i * ldg, x + i * ldx, dx + i * lddx, N, one)
        else:
            bn_backward_vector(g + i * ldg, x + i * ldx, dx + i * lddx, N, coef_col,
                               coef_col + N, coef_col + 2 * N, coef_col + 3 * N)


cdef void _layer_norm_backward(const floating* g, Py_ssize_t ldg, const floating* x,
                               Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t M,
                               Py_ssize_t D, const floating* w, const double* mean,
                               const double* rstd, floating* scratch, double* dw, double* db,
                               int T) noexcept nogil:
    # scratch: T rows of D; dw, db: T rows of D (or NULL)
    cdef Py_ssize_t t
    if T <= 1:
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, 0, M, D, w, mean, rstd, scratch, dw,
                                 db)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T),
                                 D, w, mean, rstd, scratch + t * D,
                                 dw + t * D if dw != NULL else NULL,
                                 db + t * D if db != NULL else NULL)


cdef void _batch_norm_sums(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                           Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, bint by_rows,
                           const double* mean, double* parts, double* sums,
                           int T) noexcept nogil:
    """sums (2, C): Σg and Σg·(x - mean) per feature.  parts: 2·M doubles (by rows) or
    T·2·N + N (columns: per-thread sums, then the per-column mean)."""
    cdef Py_ssize_t t, i, a, c, j, L = N // C
    cdef double* mean_col
    for c in range(2 * C):
        sums[c] = 0.0
    if by_rows:
        if T <= 1:
            bn_sums_rows(g, ldg, x, ldx, 0, M, N, C, mean, parts)
        else:
            for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                bn_sums_rows(g, ldg, x, ldx, chunk(M, t, T), chunk(M, t + 1, T), N, C, mean,
                             parts)
        for c in range(C):
            for a in range(M // C):
                i = a * C + c
                sums[c] += parts[2 * i]
                sums[C + c] += parts[2 * i + 1]
        return
    mean_col = parts + 2 * T * N
    for j in range(N):
        mean_col[j] = mean[j // L]
    if T <= 1:
        bn_sums_columns(g, ldg, x, ldx, 0, M, N, mean_col, parts, parts + N)
    else:
        for t in prange(T, num_threads=T, schedule="static", chunksize=1):
            bn_sums_columns(g, ldg, x, ldx, chunk(M, t, T), chunk(M, t + 1, T), N, mean_col,
                            parts + 2 * t * N, parts + 2 * t * N + N)
    for t in range(T):
        for j in range(N):
            sums[j // L] += parts[2 * t * N + j]
            sums[C + j // L] += parts[2 * t * N + N + j]


cdef void _batch_norm_dx(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                         floating* dx, Py_ssize_t lddx, Py_ssize_t M, Py_ssize_t N,
                         Py_ssize_t C, bint by_rows, const double* coef, const double* coef_col,
                         int T) noexcept nogil:
    cdef Py_ssize_t t
    if T <= 1:
        bn_dx_range(g, ldg, x, ldx, dx, lddx, 0, M, N, C, by_rows, coef, coef_col)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        bn_dx_range(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T), N, C, by_rows,
                    coef, coef_col)


def layer_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                        cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                        cnp.ndarray dw_parts, cnp.ndarray db_parts, int n_threads):
    """dx from grad_out g and input x (same dtype, rows of D elements) and the saved float64
    mean and rstd (one per row); weight: D elements of x's dtype or None.

    dw_parts, db_parts: float64 (T, D) arrays, T = n_threads, that receive per-thread partial
    sums of g·x̂ and g (sum them over axis 0), or None.
    """
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldg = row_stride(g, M, D, False)
    cdef Py_ssize_t lddx = row_stride(dx, M, D, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef double* mp = float64_data(mean, M)
    cdef double* rp = float64_data(rstd, M)
    cdef int T = max(1, n_threads)
    cdef double* dw = float64_data(dw_parts, T * D)
    cdef double* db = float64_data(db_parts, T * D)
    cdef void* scratch
    if is_float32(g) != f32 or is_float32(dx) != f32 or mp == NULL or rp == NULL:
        raise TypeError("layer_norm_backward: inconsistent arrays")
    if dw != NULL:
        memset(dw, 0, T * D * sizeof(double))
    if db != NULL:
        memset(db, 0, T * D * sizeof(double))
    if M == 0:
        return
    scratch = malloc(T * D * cnp.PyArray_ITEMSIZE(x))
    if scratch == NULL:
        raise MemoryError()
    with nogil:
        if f32:
            _layer_norm_backward(<const float*>cnp.PyArray_DATA(g), ldg,
                                 <const float*>cnp.PyArray_DATA(x), ldx,
                                 <float*>cnp.PyArray_DATA(dx), lddx, M, D, <const float*>w, mp,
                                 rp, <float*>scratch, dw, db, T)
        else:
            _layer_norm_backward(<const double*>cnp.PyArray_DATA(g), ldg,
                                 <const double*>cnp.PyArray_DATA(x), ldx,
                                 <double*>cnp.PyArray_DATA(dx), lddx, M, D, <const double*>w,
                                 mp, rp, <double*>scratch, dw, db, T)
    free(scratch)


def batch_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t rows,
                        Py_ssize_t cols, Py_ssize_t C, bint by_rows, cnp.ndarray mean,
                        cnp.ndarray invstd, cnp.ndarray weight, bint training,
                        cnp.ndarray sums, int n_threads):
    """dx of BatchNorm from grad_out g and input x seen as (rows, cols), features laid out as
    in feature_moments; mean and invstd: float64 (C,); weight: C elements of x's dtype or None.

    sums: float64 (2, C) that receives Σg and Σg·(x - mean) per feature (None: not wanted,
    eval only).  Returns nothing; dx is written in place.
    """
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldg = row_stride(g, rows, cols, False)
    cdef Py_ssize_t lddx = row_stride(dx, rows, cols, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, C, f32)
    cdef double* mp = float64_data(mean, C)
    cdef double* ip = float64_data(invstd, C)
    cdef double* sp = float64_data(sums, 2 * C)
    cdef int T = max(1, n_threads)
    cdef Py_ssize_t c, j, n, L
    cdef double wc, k1
    cdef double* parts = NULL
    cdef double* coef = NULL
    cdef double* coef_col = NULL
    if is_float32(g) != f32 or is_float32(dx) != f32 or mp == NULL or ip == NULL:
        raise TypeError("batch_norm_backward: inconsistent arrays")
    if C <= 0 or (by_rows and rows % C) or (not by_rows and cols % C):
        raise ValueError("batch_norm_backward: inconsistent shape")
    if training and sp == NULL:
        raise ValueError("batch_norm_backward: training needs the sums array")
    if rows * cols == 0:
        if sp != NULL:
            memset(sp, 0, 2 * C * sizeof(double))
        return
    n = (rows // C) * cols if by_rows else rows * (cols // C)
    L = cols // C
    parts = <double*>malloc(sizeof(double) * (2 * rows if by_rows else 2 * T * cols + cols))
    coef = <double*>malloc(sizeof(double) * 4 * C)
    coef_col = <double*>malloc(sizeof(double) * (4 * cols if not by_rows else 1))
    if parts == NULL or coef == NULL or coef_col == NULL:
        free(parts)
        free(coef)
        free(coef_col)
        raise MemoryError()
    try:
        with nogil:
            if sp != NULL:
                if f32:
                    _batch_norm_sums(<const float*>cnp.PyArray_DATA(g), ldg,
                                     <const float*>cnp.PyArray_DATA(x), ldx, rows, cols, C,
                                     by_rows, mp, parts, sp, T)
                else:
                    _batch_norm_sums(<const double*>cnp.PyArray_DATA(g), ldg,
                                     <const double*>cnp.PyArray_DATA(x), ldx, rows, cols, C,
                                     by_rows, mp, parts, sp, T)
            for c in range(C):
                if w == NULL:
                    wc = 1.0
                elif f32:
                    wc = (<const float*>w)[c]
                else:
                    wc = (<const double*>w)[c]
                k1 = wc * ip[c]
                coef[c] = mp[c]
                coef[C + c] = k1
                coef[2 * C + c] = -k1 * ip[c] * ip[c] * sp[C + c] / n if training else 0.0
                coef[3 * C + c] = -k1 * sp[c] / n if training else 0.0
            if not by_rows:
                for j in range(cols):
                    for c in range(4):
                        coef_col[c * cols + j] = coef[c * C + j // L]
            if f32:
                _batch_norm_dx(<const float*>cnp.PyArray_DATA(g), ldg,
                               <const float*>cnp.PyArray_DATA(x), ldx,
                               <float*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, by_rows, coef,
                               coef_col, T)
            else:
                _batch_norm_dx(<const double*>cnp.PyArray_DATA(g), ldg,
                               <const double*>cnp.PyArray_DATA(x), ldx,
                               <double*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, by_rows,
                               coef, coef_col, T)
    finally:
        free(parts)
        free(coef)
        free(coef_col)
