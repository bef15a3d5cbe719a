# Per-feature moments: BatchNorm training's statistics and cynorm.moments (and through it the
# scikit-learn scaler and Dask).  Features laid out as (rows, cols): by rows (each row one
# feature's contiguous run, (N, C, L) with long L), or down the columns (core/columns.pxi).
# The count comes back negative when some M2 is not finite, for the overflow rescue.

cdef void moments_rows(const floating* x, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1,
                       Py_ssize_t L, double* parts) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(r0, r1):
        row_moments(x + i * ld, L, &parts[3 * i], &parts[3 * i + 1], &parts[3 * i + 2])


cdef void moments_half_rows(const uint16_t* x, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t L, double* parts, double* sums, int kind) noexcept nogil:
    """moments_rows of 16-bit rows (kind: core/halves.pxi's), widened in registers
    (row_moments_half): the moments of a float32 copy's rows, to the bit.  sums (unless
    NULL): each row's exact sum of differences from its first element, two floats a row."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        row_moments_half(x + i * ld, L, kind, &parts[3 * i], &parts[3 * i + 1],
                         &parts[3 * i + 2], &sums[2 * i] if sums != NULL else NULL)


cdef void row_mean_rests(const double* parts, const double* sums, Py_ssize_t M, Py_ssize_t L,
                         Py_ssize_t C, const double* stats, double* acc,
                         double* rest) noexcept nogil:
    """Each feature's exact mean remainder (core/moments.pxi's mean_rest) from its rows' exact
    sums: Σx = Σ(sums + L·hi) added in two floats per feature (acc: 2·C doubles), the
    features inner (independent additions)."""
    cdef Py_ssize_t a, c, i
    cdef double n = <double>((M // C) * L), p, u, ue, e
    memset(acc, 0, 2 * C * sizeof(double))
    for a in range(M // C):
        for c in range(C):
            # the row's Σx = its sums + L·hi, the product in two floats (its remainder 0 where
            # hi is the row's first element, a 16-bit value; not where block_moments_half
            # moved hi to the mean)
            i = a * C + c
            p = <double>L * parts[3 * i]
            two_sum(p, sums[2 * i], &u, &ue)
            two_sum(acc[2 * c], u, &acc[2 * c], &e)
            acc[2 * c + 1] += ((sums[2 * i + 1] + fma(<double>L, parts[3 * i], -p)) + ue) + e
    for c in range(C):
        rest[c] = mean_rest(0.0, acc[2 * c], acc[2 * c + 1], n, 1.0 / n,
                            stats[c] + stats[C + c])


cdef double merge_row_parts(const double* parts, Py_ssize_t M, Py_ssize_t L, Py_ssize_t C,
                            double* stats) noexcept nogil:
    """The rows' moments (row i belongs to feature i % C) merged per feature into stats (3, C),
    in row order; returns the count per feature."""
    cdef Py_ssize_t i, a, c
    cdef double n = 0.0
    for c in range(C):
        n = 0.0
        for a in range(M // C):
            i = a * C + c
            merge_one(&n, &stats[c], &stats[C + c], &stats[2 * C + c], <double>L,
                      parts[3 * i], parts[3 * i + 1], parts[3 * i + 2])
    return n


cdef double _row_feature_moments(const floating* x, Py_ssize_t ld, Py_ssize_t M, Py_ssize_t L,
                                 Py_ssize_t C, double* parts, double* stats,
                                 int n_threads) noexcept nogil:
    """Moments of rows (row i belongs to feature i % C), merged per feature into stats (3, C)."""
    cdef Py_ssize_t t
    if n_threads <= 1:
        moments_rows(x, ld, 0, M, L, parts)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
            moments_rows(x, ld, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), L, parts)
    return merge_row_parts(parts, M, L, C, stats)


cdef double _half_row_feature_moments(const uint16_t* x, Py_ssize_t ld, Py_ssize_t M,
                                      Py_ssize_t L, Py_ssize_t C, double* parts, double* sums,
                                      double* stats, double* rest, int kind,
                                      int n_threads) noexcept nogil:
    """_row_feature_moments of 16-bit rows; with rest (and sums: 2·M + 2·C doubles), each
    feature's exact mean remainder too (row_mean_rests)."""
    cdef Py_ssize_t t
    cdef double n
    if rest == NULL:
        sums = NULL
    if n_threads <= 1:
        moments_half_rows(x, ld, 0, M, L, parts, sums, kind)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
            moments_half_rows(x, ld, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), L,
                              parts, sums, kind)
    n = merge_row_parts(parts, M, L, C, stats)
    if rest != NULL:
        row_mean_rests(parts, sums, M, L, C, stats, sums + 2 * M, rest)
    return n


cdef double merge_column_parts(const double* parts, Py_ssize_t stride, Py_ssize_t T,
                               Py_ssize_t F, Py_ssize_t C, double* stats) noexcept nogil:
    """The T chunks' column moments (each at parts + t·stride: count, pad, then hi, lo, M2 of
    F columns) merged per feature into stats (3, C), chunk by chunk: column j belongs to
    feature j // (F // C).  Returns the count per feature."""
    cdef Py_ssize_t t, j, c, L = F // C
    cdef const double* p
    cdef double n = 0.0
    for c in range(C):
        n = 0.0
        for t in range(T):
            p = parts + t * stride
            for j in range(c * L, (c + 1) * L):
                merge_one(&n, &stats[c], &stats[C + c], &stats[2 * C + c], p[0], p[2 + j],
                          p[2 + F + j], p[2 + 2 * F + j])
    return n


cdef double _column_feature_moments(const floating* x, Py_ssize_t ld, Py_ssize_t M,
                                    Py_ssize_t F, Py_ssize_t C, Py_ssize_t T,
                                    Py_ssize_t rows_per_block, const unsigned char* mask,
                                    double* parts, double* stats, bint fast,
                                    const uint16_t* x16=NULL, int kind=-1,
                                    float* wide=NULL) noexcept nogil:
    """Moments of the columns of a (M, F) array over T row chunks in parallel, then merged per
    feature into stats (3, C): column j belongs to feature j // (F // C).  fast: float32 rows
    take the float32 sweep (column_chunk_moments).  x16 (with floating float, x NULL): 16-bit
    rows of that kind, widened rows_per_block at a time as column_chunk_moments gathers them
    (wide: rows_per_block·F floats per thread)."""
    cdef Py_ssize_t t, stride = 2 + 6 * F
    cdef double* p
    cdef int n_threads = <int>T
    cdef bint f32_sweep = fast and floating is float
    # parts: per chunk [count, pad] + 5 arrays of F doubles (hi, lo, m2, and scratch c, q)
    # + F doubles of scratch for the float32 sweep (2 F floats)
    if T == 1:
        column_chunk_moments(x, ld, 0, M, F, rows_per_block, mask, parts, parts + 2,
                             parts + 2 + F, parts + 2 + 2 * F, parts + 2 + 3 * F,
                             parts + 2 + 4 * F,
                             <float*>(parts + 2 + 5 * F) if f32_sweep else NULL, x16, kind,
                             wide)
    else:
        for t in prange(T, num_threads=n_threads, schedule="static", chunksize=1):
            p = parts + t * stride
            column_chunk_moments(x, ld, chunk(M, t, T), chunk(M, t + 1, T), F, rows_per_block,
                                 mask, p, p + 2, p + 2 + F, p + 2 + 2 * F, p + 2 + 3 * F,
                                 p + 2 + 4 * F, <float*>(p + 2 + 5 * F) if f32_sweep else NULL,
                                 x16, kind, wide + t * rows_per_block * F if wide != NULL
                                 else NULL)
    return merge_column_parts(parts, stride, T, F, C, stats)


cdef inline Py_ssize_t half_block_rows(Py_ssize_t F) noexcept nogil:
    """Rows of 16-bit x per block down the columns (and of the scratch the first block is
    widened into): HALF_COLUMN_BYTES of float32 rows, at least FIRST_BLOCK_ROWS."""
    cdef Py_ssize_t r = HALF_COLUMN_BYTES // (4 * F)
    return FIRST_BLOCK_ROWS if r < FIRST_BLOCK_ROWS else (MAX_BLOCK_ROWS if r > MAX_BLOCK_ROWS
                                                           else r)


def feature_moments(cnp.ndarray x, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t C,
                    bint by_rows, cnp.ndarray stats, int n_threads, Py_ssize_t rows_per_block=64,
                    cnp.ndarray mask=None, bint fast=False, int half=-1,
                    cnp.ndarray rest=None):
    """Per-feature moments of x seen as (rows, cols): stats (3, C) float64 receives the mean
    as hi + lo and M2; returns the count per feature, negated when some M2 is not finite.

    by_rows: row i belongs to feature i % C (the (N, C, L) layout with long L, rows of L).
    Otherwise column j belongs to feature j // (cols // C) ((N, C) and short L), reduced down
    the columns over row chunks, one per thread; mask (one bool per row, column layout only)
    keeps the rows it marks True.  fast (column layout, float32 x): M2 to about 1e-7 relative
    instead of float64 ulps, in about half the time (BatchNorm's forward pass; see
    column_chunk_moments).  half: x holds float16 (HALF_FLOAT16) or bfloat16 (HALF_BFLOAT16)
    bits, widened to float32 as they are read, a row at a time (by rows) or down the columns
    in registers (the moments of a float32 copy, without the copy), always by the float64
    sweep: the float32 one's mean, off by some 1e-9 of the standard deviation, would move
    16-bit outputs next to the mean by more than their one-ulp bound.  rest (C,) float64
    (16-bit x by rows only): each feature's exact mean remainder for affine_half's float64
    redo (core/moments.pxi's mean_rest).
    """
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef Py_ssize_t ld = row_stride(x, rows, cols, False)
    cdef int f32 = 1 if half >= 0 else is_float32(x)
    cdef double* st = float64_data(stats, 3 * C)
    cdef double* rp = float64_data(rest, C)
    cdef Py_ssize_t T, j, nparts, nrows
    cdef double n
    cdef double* parts
    if rows_per_block < 1:
        raise ValueError("feature_moments: rows_per_block must be positive")
    if rows * cols == 0 or not layout_fits(rows, cols, C, by_rows):
        raise ValueError("feature_moments: inconsistent shape")
    if by_rows and mk != NULL:
        raise ValueError("feature_moments: a row mask needs the column layout")
    if half >= 0 and (not is_bits16(x) or (half != HALF_F16 and half != HALF_BF16)):
        raise ValueError("feature_moments: half= takes 16-bit x of a known kind")
    T = 1 if by_rows else max(1, min(n_threads, rows // 64))
    rows_per_block = min(rows_per_block, MAX_BLOCK_ROWS)
    if rp != NULL and not (half >= 0 and by_rows):
        raise ValueError("feature_moments: rest= takes 16-bit x by rows")
    if half >= 0 and by_rows:    # per row: its moments and (with rest) its sums
        nparts, nrows = 3 * rows + (2 * rows + 2 * C if rp != NULL else 0), 0
    elif half >= 0:              # per chunk: its moments; a block of float32 rows
        rows_per_block = half_block_rows(cols)
        nparts, nrows = T * (2 + 6 * cols), T * rows_per_block * cols
    else:
        nparts, nrows = (3 * rows if by_rows else T * (2 + 6 * cols)), 0
    parts = <double*>malloc(sizeof(double) * nparts + sizeof(float) * nrows)
    if parts == NULL:
        raise MemoryError()
    try:
        with nogil:
            if half >= 0 and by_rows:
                n = _half_row_feature_moments(<const uint16_t*>cnp.PyArray_DATA(x), ld, rows,
                                              cols, C, parts, parts + 3 * rows, st, rp, half,
                                              max(1, n_threads))
            elif half >= 0:
                n = _column_feature_moments(<const float*>NULL, ld, rows, cols, C, T,
                                            rows_per_block, mk, parts, st, False,
                                            <const uint16_t*>cnp.PyArray_DATA(x), half,
                                            <float*>(parts + nparts))
            elif by_rows and f32:
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
