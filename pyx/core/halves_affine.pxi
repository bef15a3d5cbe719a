# Core: the per-feature affine on 16-bit floats (float16, bfloat16), BatchNorm's output and
# the group norms': y = (x - m) * s + t per feature, read and written in 16 bits.  The
# parameters come from half_affine_params (float64, and float32 rows for the vector loop); the
# rows go through core/halves.h's cynorm_affine_half and cynorm_affine_cols_half (float32, and
# float64 where the shift cancels the product).  Its C declarations are core/halves.pxi's,
# included before it.

# half_affine_params' float32 rows per feature (m_hi, scale, shift)
cdef enum:
    HALF_PARAM_ROWS = 3


cdef void half_affine_rows(const uint16_t* x, Py_ssize_t ldx, uint16_t* y, Py_ssize_t ldy,
                           Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t cols, bint by_rows,
                           const double* params, Py_ssize_t P, const unsigned char* mask,
                           bint write_padding, float* scratch, int kind, Py_ssize_t j0=0,
                           Py_ssize_t j1=-1) noexcept nogil:
    """Rows r0..r1, columns j0..j1 (j1 -1: to cols), each row in pieces of at most
    AFFINE_CHUNK elements: by_rows, row i is one feature, i % P (its m, s, t scalars); else
    each column has its own (P == cols), and kept rows of up to AFFINE_CHUNK / HALF_STRIP_ROWS
    elements go in blocks of about AFFINE_CHUNK (cynorm_affine_cols_half: sixteen columns at
    a time down the block).  params: (3, P) float64, then (HALF_PARAM_ROWS, P) float32
    (half_affine_params).  Rows the mask drops are written as 0 (unless write_padding is off).
    An element's bits do not depend on the pieces or blocks: core/halves.h computes each on
    its own, a row's last few under a mask with a whole sixteen's arithmetic."""
    cdef Py_ssize_t i, e, a, n, f, R
    cdef const float* pf = <const float*>(params + 3 * P)
    if j1 < 0:
        j1 = cols
    if j1 <= j0:
        return
    R = AFFINE_CHUNK // (j1 - j0) if j1 - j0 < AFFINE_CHUNK else 1
    i = r0
    while i < r1:
        if mask != NULL and not mask[i]:
            if write_padding:
                memset(y + i * ldy + j0, 0, (j1 - j0) * sizeof(uint16_t))
            i += 1
            continue
        if not by_rows and R >= HALF_STRIP_ROWS:   # a block of kept rows
            e = i + 1
            while e < r1 and e - i < R and (mask == NULL or mask[e]):
                e += 1
            cynorm_affine_cols_half(x + i * ldx + j0, ldx, y + i * ldy + j0, ldy, e - i,
                                    j1 - j0, params + j0, params + P + j0,
                                    params + 2 * P + j0, pf + j0, pf + P + j0, pf + 2 * P + j0,
                                    scratch, kind)
            i = e
            continue
        a = j0
        f = i % P if by_rows else a
        while a < j1:
            n = j1 - a if j1 - a < AFFINE_CHUNK else AFFINE_CHUNK
            cynorm_affine_half(x + i * ldx + a, y + i * ldy + a, n, params + f,
                               params + P + f, params + 2 * P + f, pf + f, pf + P + f,
                               pf + 2 * P + f, not by_rows, scratch, kind)
            a += n
            f = f if by_rows else a
        i += 1


# Below this fraction of the mean its second float64 term is the statistics' own error (a row
# or feature's hi + lo has been seen 1e-21 of the mean off the exact value), not a remainder of
# the mean's rounding (those are up to 2^-53 of it, and below 2^-60 one time in about 2^7).
cdef double MEAN_NOISE = 8.673617379884035e-19   # 2^-60
# Nor is a second term below this fraction of the standard deviation: merging parts' means
# (Chan's formula) rounds at some 2^-53 of the spread of those means, a few times the standard
# deviation or less for parts of one distribution.  Taking it as 0 moves outputs by at most
# 2^-50 of the scale, where keeping it would move an element equal to the mean off 0.
cdef double SPREAD_NOISE = 8.881784197001252e-16   # 2^-50


cdef void half_affine_params(const double* st, double var_scale, const float* w,
                             const float* b, double eps, Py_ssize_t C, Py_ssize_t L,
                             double* params, double* rstd=NULL, Py_ssize_t per=1,
                             Py_ssize_t c0=0, Py_ssize_t c1=-1,
                             const double* rest=NULL) noexcept nogil:
    """params (3, C·L) float64, m, s, t of each feature repeated L times: m = the mean (hi +
    lo) rounded to one float64, s = w / sqrt(var + eps) (NaN where var + eps is 0 or var is
    not finite, as feature_params), t = b - mlo * s (mlo what the rounding of m left out:
    core/halves.h's float64 lanes are those where t cancels the product, down to far below
    m's rounding; below MEAN_NOISE of m or SPREAD_NOISE of the standard deviation it is taken
    as 0, the two-term mean's own error, so that an element equal to the mean gives exactly
    b); then (3, C·L) float32,
    feature_params' m_hi, scale and shift of m: HALF_PARAM_ROWS rows.
    rstd (unless NULL): 1 / sqrt(var + eps) of feature c into rstd[c // per] (the group
    norms' per-group rstd).  Features c0..c1 only (c1 -1: to C).  rest (unless NULL): mlo of
    feature c given exactly, at rest[c // per] (mean_rest's, from the sums of a 16-bit row),
    taken as it is: it carries no noise to leave out."""
    cdef Py_ssize_t c, k, j, n, P = C * L
    cdef int r
    cdef double var, mlo, mn = MEAN_NOISE, sn = SPREAD_NOISE
    cdef bint noise
    cdef int nz
    # one chunk's rows (HALF_PARAM_ROWS + 3 of them), made in loops the compiler vectorizes
    # with each feature's statements as one feature's (so the same bits), then copied out
    cdef double sc[ROOT_CHUNK]
    cdef double ms[ROOT_CHUNK]
    cdef double ts[ROOT_CHUNK]
    cdef double bs[ROOT_CHUNK]
    cdef float rows[HALF_PARAM_ROWS][ROOT_CHUNK]
    cdef float ml[ROOT_CHUNK]
    cdef float* pf = <float*>(params + 3 * P)
    if c1 < 0:
        c1 = C
    c = c0
    while c < c1:
        n = min(ROOT_CHUNK, c1 - c)
        inv_stds(st + 2 * C + c, var_scale, eps, n, sc)
        if rstd != NULL:
            for k in range(n):
                rstd[(c + k) // per] = sc[k]
        nz = 0
        for k in range(n):
            bs[k] = b[c + k] if b != NULL else 0.0
            ms[k] = st[c + k] + st[C + c + k]
            ts[k] = (st[c + k] - ms[k]) + st[C + c + k]
            nz = nz | (ts[k] != 0.0)
        if rest != NULL:
            for k in range(n):
                ts[k] = rest[(c + k) // per]
        elif nz:   # (none where each mean is one float64, as running means are)
            for k in range(n):
                var = st[2 * C + c + k] * var_scale
                # below these, the statistics' own last bits, not a remainder of the mean
                noise = (fabs(ts[k]) < mn * fabs(ms[k])) | (fabs(ts[k]) < sn * sqrt(var))
                ts[k] = 0.0 if noise else ts[k]
        for k in range(n):
            var = st[2 * C + c + k] * var_scale
            mlo = ts[k]
            if isinf(sc[k]) | isinf(var):
                sc[k] = NAN
            if w != NULL:
                sc[k] = sc[k] * w[c + k]
            ts[k] = bs[k] - mlo * sc[k]
        # the mean rounded to one float64 first, as the 16-bit rows do (core/halves.pxi's
        # half_norm_rows): an element equal to the mean then gives exactly t
        cynorm_split_many(ms, rows[0], ml, n)
        for k in range(n):
            rows[1][k] = <float>sc[k]
            rows[2][k] = <float>(bs[k] - <double>ml[k] * <double>rows[1][k])
        if L == 1:
            for k in range(n):
                params[c + k] = ms[k]
                params[P + c + k] = sc[k]
                params[2 * P + c + k] = ts[k]
                pf[c + k] = rows[0][k]
                pf[P + c + k] = rows[1][k]
                pf[2 * P + c + k] = rows[2][k]
            c += n
            continue
        for j in range(L):
            for k in range(n):
                params[(c + k) * L + j] = ms[k]
                params[P + (c + k) * L + j] = sc[k]
                params[2 * P + (c + k) * L + j] = ts[k]
            for r in range(HALF_PARAM_ROWS):
                for k in range(n):
                    pf[r * P + (c + k) * L + j] = rows[r][k]
        c += n


cdef void half_affine_columns(const double* st, double var_scale, const float* w,
                              const float* b, double eps, Py_ssize_t C, double* params,
                              const uint16_t* x, Py_ssize_t ldx, uint16_t* y, Py_ssize_t ldy,
                              Py_ssize_t rows, const unsigned char* mask, bint write_padding,
                              float* scratch, int kind, Py_ssize_t c0, Py_ssize_t c1,
                              const double* rest) noexcept nogil:
    """Features c0..c1 of the one-feature-a-column layout (cols == C), HALF_COLUMN_BLOCK at a
    time: the block's parameters (half_affine_params), then its columns down every row
    (half_affine_rows) while they are still in L1."""
    cdef Py_ssize_t a = c0, e
    while a < c1:
        e = a + HALF_COLUMN_BLOCK if c1 - a > HALF_COLUMN_BLOCK else c1
        half_affine_params(st, var_scale, w, b, eps, C, 1, params, NULL, 1, a, e, rest)
        half_affine_rows(x, ldx, y, ldy, 0, rows, C, False, params, C, mask, write_padding,
                         scratch, kind, a, e)
        a = e


def affine_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t rows, Py_ssize_t cols, bint by_rows,
                cnp.ndarray stats, double var_scale, cnp.ndarray weight, cnp.ndarray bias,
                double eps, int kind, int n_threads, cnp.ndarray mask=None,
                bint write_padding=True, cnp.ndarray rest=None):
    """BatchNorm's output on 16-bit x and y seen as (rows, cols) (float16: kind HALF_F16,
    bfloat16: HALF_BF16): y = (x - mean) * weight / sqrt(var + eps) + bias per feature, in
    float64, from stats (3, C) float64 (the mean as hi + lo, the variance times
    1 / var_scale) and float32 weight and bias (or None).  Features laid out as in
    feature_moments: by_rows, row i is feature i % C; else column j is feature j // (cols / C).
    rest (C,) float64 or None: each feature's exact mean remainder (feature_moments'), used
    as it is by the float64 redo instead of the thresholded one made from stats."""
    cdef Py_ssize_t C = cnp.PyArray_SIZE(stats) // 3, t
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldy = row_stride(y, rows, cols, True)
    cdef Py_ssize_t L = 1 if by_rows or C == 0 else cols // C, P
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef double* st = float64_data(stats, 3 * C, False)
    cdef const double* rp = float64_data(rest, C, False)
    cdef const float* w = <const float*>optional_data(weight, C, 1)
    cdef const float* b = <const float*>optional_data(bias, C, 1)
    cdef int T = max(1, n_threads)
    cdef double* params
    cdef float* scratch
    cdef Py_ssize_t c0, c1
    # each thread makes its columns' parameters and writes them down every row
    cdef bint by_features = split_features(T, by_rows, rows, cols, C)
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(x) or not is_bits16(y):
        raise TypeError("affine_half takes x and y as 16-bit float (or uint16) arrays")
    if not layout_fits(rows, cols, C, by_rows):
        raise ValueError("affine_half: inconsistent shape")
    if rows * cols == 0:
        return
    P = C * L
    params = <double*>malloc(3 * P * sizeof(double)
                             + (HALF_PARAM_ROWS * P + T * AFFINE_CHUNK) * sizeof(float))
    if params == NULL:
        raise MemoryError()
    scratch = <float*>(params + 3 * P) + HALF_PARAM_ROWS * P
    try:
        with nogil:
            if by_features:
                for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                    c0 = feature_cut(C, t, T)
                    c1 = feature_cut(C, t + 1, T)
                    if c1 > c0:
                        half_affine_columns(st, var_scale, w, b, eps, C, params,
                                            <const uint16_t*>cnp.PyArray_DATA(x), ldx,
                                            <uint16_t*>cnp.PyArray_DATA(y), ldy, rows, mk,
                                            write_padding, scratch + t * AFFINE_CHUNK, kind,
                                            c0, c1, rp)
            elif T <= 1 and not by_rows and L == 1:
                half_affine_columns(st, var_scale, w, b, eps, C, params,
                                    <const uint16_t*>cnp.PyArray_DATA(x), ldx,
                                    <uint16_t*>cnp.PyArray_DATA(y), ldy, rows, mk,
                                    write_padding, scratch, kind, 0, C, rp)
            elif T <= 1:
                half_affine_params(st, var_scale, w, b, eps, C, L, params, NULL, 1, 0, -1, rp)
                half_affine_rows(<const uint16_t*>cnp.PyArray_DATA(x), ldx,
                                 <uint16_t*>cnp.PyArray_DATA(y), ldy, 0, rows, cols, by_rows,
                                 params, P, mk, write_padding, scratch, kind)
            else:
                half_affine_params(st, var_scale, w, b, eps, C, L, params, NULL, 1, 0, -1, rp)
                for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                    half_affine_rows(<const uint16_t*>cnp.PyArray_DATA(x), ldx,
                                     <uint16_t*>cnp.PyArray_DATA(y), ldy, chunk(rows, t, T),
                                     chunk(rows, t + 1, T), cols, by_rows, params, P, mk,
                                     write_padding, scratch + t * AFFINE_CHUNK, kind)
    finally:
        free(params)
