# BatchNorm forward: the per-feature parameters (scale = w·invstd, shift = b - m_lo·scale, with
# the mean's hi part subtracted from x exactly), the running-statistics update, and the
# normalization y = (x - m_hi)·scale + shift by rows or down the columns.

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


cdef void normalize_rows_range(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                               Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L, Py_ssize_t C,
                               const floating* params, bint stream) noexcept nogil:
    # params rows: m_hi, scale, shift; row i of x belongs to feature i % C
    cdef Py_ssize_t i, c
    for i in range(r0, r1):
        c = row_feature(i, C)
        normalize_row_scalar(x + i * ldx, y + i * ldy, L, params[c], params[C + c],
                             params[2 * C + c], stream)
    if stream:
        cynorm_sfence()


cdef void normalize_columns_range(const floating* x, Py_ssize_t ldx, floating* y,
                                  Py_ssize_t ldy, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F,
                                  Py_ssize_t C, const floating* params,
                                  const unsigned char* mask, bint write_padding,
                                  bint stream, Py_ssize_t c0=0, Py_ssize_t c1=-1) noexcept nogil:
    # column j of x belongs to feature j // (F // C); features c0..c1 (c1 -1: to C) of rows
    # r0..r1; masked rows are written as 0 (or left alone when y is known to hold zeros)
    cdef Py_ssize_t i, c, L = F // C
    if c1 < 0:
        c1 = C
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            if write_padding:
                zero_row(y + i * ldy + c0 * L, (c1 - c0) * L, stream)
        elif L == 1:
            normalize_row_vector(x + i * ldx + c0, y + i * ldy + c0, c1 - c0, params + c0,
                                 params + C + c0, params + 2 * C + c0, stream)
        else:
            for c in range(c0, c1):
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


cdef inline void feature_params(double hi, double lo, double var, double invstd,
                                const floating* w, const floating* b, Py_ssize_t c,
                                Py_ssize_t C, floating* params) noexcept nogil:
    """Column c of params (3, C): m_hi, scale = w / sqrt(var + eps), shift = b - m_lo * scale,
    from invstd = 1 / sqrt(var + eps) (inv_stds').

    y = (x - m_hi) * scale + shift: x - m_hi is exact for x near the mean, and the remainder
    m_lo of the mean, folded into shift, is applied at the precision of the output.
    """
    cdef double scale
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
    cdef double inv[ROOT_CHUNK]
    for c in range(C):
        if c % ROOT_CHUNK == 0:
            inv_stds(m2 + c, var_scale, eps, min(ROOT_CHUNK, C - c), inv)
        feature_params(hi[c], lo[c], m2[c] * var_scale, inv[c % ROOT_CHUNK], w, b, c, C,
                       params)


cdef void _running_params(const floating* rm, const floating* rv, const floating* w,
                          const floating* b, double eps, Py_ssize_t C, floating* params,
                          Py_ssize_t c0=0, Py_ssize_t c1=-1) noexcept nogil:
    """params (3, C) of features c0..c1 (c1 -1: to C) from the running statistics."""
    cdef Py_ssize_t c
    cdef double inv[ROOT_CHUNK]
    if c1 < 0:
        c1 = C
    for c in range(c0, c1):
        if (c - c0) % ROOT_CHUNK == 0:
            inv_stds(rv + c, 1.0, eps, min(ROOT_CHUNK, c1 - c), inv)
        feature_params(rm[c], 0.0, rv[c], inv[(c - c0) % ROOT_CHUNK], w, b, c, C, params)


cdef void _running_by_features(const floating* x, Py_ssize_t ldx, floating* y, Py_ssize_t ldy,
                               Py_ssize_t M, Py_ssize_t C, const floating* rm,
                               const floating* rv, const floating* w, const floating* b,
                               double eps, floating* params, const unsigned char* mask,
                               bint write_padding, int n_threads) noexcept nogil:
    """Eval-mode BatchNorm of few rows of many features, one a column: each thread makes the
    parameters of its own columns (feature_cut), then normalizes those columns down every
    row.  Splitting the rows instead leaves every parameter to one thread."""
    cdef Py_ssize_t t, c0, c1
    cdef bint stream = streamed(M * C * <Py_ssize_t>sizeof(floating), n_threads)
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        c0 = feature_cut(C, t, n_threads)
        c1 = feature_cut(C, t + 1, n_threads)
        if c1 > c0:
            _running_params(rm, rv, w, b, eps, C, params, c0, c1)
            normalize_columns_range(x, ldx, y, ldy, 0, M, C, C, params, mask, write_padding,
                                    stream, c0, c1)


cdef inline double running_value(double r, double batch, double momentum) noexcept nogil:
    """The running update, (1 - momentum) r + momentum batch, in float64 (every buffer dtype)."""
    return (1.0 - momentum) * r + momentum * batch


cdef void _update_running(floating* rm, floating* rv, const double* stats, Py_ssize_t C,
                          double count, double momentum) noexcept nogil:
    cdef Py_ssize_t c
    cdef double unbias = 1.0 / (count - 1.0)
    for c in range(C):
        rm[c] = <floating>running_value(rm[c], stats[c] + stats[C + c], momentum)
        rv[c] = <floating>running_value(rv[c], stats[2 * C + c] * unbias, momentum)


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
    cdef bint by_features = split_features(n_threads, by_rows, rows, cols, C)
    if by_rows and mk != NULL:
        raise ValueError("normalize_running: a row mask needs the column layout")
    if is_float32(y) != f32 or rm == NULL or rv == NULL:
        raise TypeError("x, y and the running statistics must share one dtype")
    if not layout_fits(rows, cols, C, by_rows):
        raise ValueError("normalize_running: inconsistent shape")
    if rows * cols == 0:
        return
    params = malloc(3 * C * cnp.PyArray_ITEMSIZE(x))
    if params == NULL:
        raise MemoryError()
    with nogil:
        if by_features and f32:
            _running_by_features(<const float*>cnp.PyArray_DATA(x), ldx,
                                 <float*>cnp.PyArray_DATA(y), ldy, rows, C, <const float*>rm,
                                 <const float*>rv, <const float*>w, <const float*>b, eps,
                                 <float*>params, mk, write_padding, n_threads)
        elif by_features:
            _running_by_features(<const double*>cnp.PyArray_DATA(x), ldx,
                                 <double*>cnp.PyArray_DATA(y), ldy, rows, C, <const double*>rm,
                                 <const double*>rv, <const double*>w, <const double*>b, eps,
                                 <double*>params, mk, write_padding, n_threads)
        elif f32:
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


cdef void _update_running_half(uint16_t* rm, uint16_t* rv, const double* stats, Py_ssize_t C,
                               double count, double momentum, int kind) noexcept nogil:
    # _update_running's float64 expressions on 16-bit buffers, each rounded once
    cdef Py_ssize_t c
    cdef double unbias = 1.0 / (count - 1.0)
    for c in range(C):
        rm[c] = cynorm_d2half(running_value(cynorm_half2f(rm[c], kind),
                                            stats[c] + stats[C + c], momentum), kind)
        rv[c] = cynorm_d2half(running_value(cynorm_half2f(rv[c], kind),
                                            stats[2 * C + c] * unbias, momentum), kind)


def update_running(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray stats,
                   double count, double momentum, int half=-1):
    """r = (1 - momentum) r + momentum batch, in place; running_var gets the unbiased variance.
    half: the buffers' 16-bit kind (HALF_FLOAT16, HALF_BFLOAT16), -1 for float32 / float64."""
    cdef Py_ssize_t C = cnp.PyArray_SIZE(running_mean)
    cdef double* st = float64_data(stats, 3 * C)
    cdef int f32 = is_float32(running_mean) if half == -1 else 0
    if (cnp.PyArray_SIZE(running_var) != C
            or (half == -1 and is_float32(running_var) != f32)
            or cnp.PyArray_TYPE(running_var) != cnp.PyArray_TYPE(running_mean)
            or not cnp.PyArray_IS_C_CONTIGUOUS(running_mean)
            or not cnp.PyArray_IS_C_CONTIGUOUS(running_var)
            or not cnp.PyArray_ISWRITEABLE(running_mean)
            or not cnp.PyArray_ISWRITEABLE(running_var)):
        raise ValueError("running buffers must be writable contiguous arrays of one dtype")
    if half != -1:
        if half != HALF_F16 and half != HALF_BF16:
            raise ValueError(f"unknown 16-bit kind {half}")
        if not is_bits16(running_mean) or not is_bits16(running_var):
            raise TypeError("16-bit running buffers expected")
        _update_running_half(<uint16_t*>cnp.PyArray_DATA(running_mean),
                             <uint16_t*>cnp.PyArray_DATA(running_var), st, C, count, momentum,
                             half)
    elif f32:
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
    if not layout_fits(rows, cols, C, by_rows):
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
