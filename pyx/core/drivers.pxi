# Core: the row driver (contiguous ranges of rows per thread, chunk), the per-thread partial
# sums' reduction, and the entry points' last checks of the arrays they are given.
#
# Rows are ``ld`` elements apart (negative for reversed views) and each row is contiguous.
# Each kernel is one function over a range of rows; the drivers run it on the calling thread,
# or on n_threads contiguous ranges under prange.  Python validated the arguments already;
# the entry points repeat only the checks without which a mistake would read or write out of
# bounds, then dispatch on the dtype once.

# A one-thread prange still costs a thread-team round trip, a third of a small call: the
# drivers call the range function directly then (benchmarks/RESULTS.md, item 7).


cdef inline Py_ssize_t chunk(Py_ssize_t M, Py_ssize_t t, Py_ssize_t T) noexcept nogil:
    return (M * t) // T


cdef inline Py_ssize_t feature_cut(Py_ssize_t C, Py_ssize_t t, Py_ssize_t T) noexcept nogil:
    """Where thread t's features start when T threads split C features of one column each:
    chunk(C, t, T) down to a multiple of 32 columns (whole output lines to each thread, and
    the same sixteen-wide blocks as a whole row), C for t >= T."""
    return C if t >= T else (chunk(C, t, T) // 32) * 32


cdef inline bint split_features(int T, bint by_rows, Py_ssize_t rows, Py_ssize_t cols,
                                Py_ssize_t C) noexcept nogil:
    """Whether T threads split the features (feature_cut) rather than the rows: few rows of
    many features, one feature a column.  Split by rows, one thread would make every feature's
    parameters and the others read them from its cache."""
    return (T > 1 and not by_rows and cols == C and rows <= C and C >= FEATURE_SPLIT_MIN)


cdef inline Py_ssize_t part_stride(Py_ssize_t D) noexcept nogil:
    """Doubles between two threads' rows of partial sums: D rounded up to whole 64-byte lines,
    so that no line holds two threads' sums (a line both threads write bounces between their
    cores at every update; the rows must start on a line, see aligned_parts)."""
    return (D + 7) // 8 * 8


cdef double* aligned_parts(void** block, Py_ssize_t n) noexcept nogil:
    """n zeroed doubles starting on a 64-byte line (NULL when out of memory); *block is what
    free() takes."""
    block[0] = calloc(n + 8, sizeof(double))
    if block[0] == NULL:
        return NULL
    return <double*>((<size_t>block[0] + 63) // 64 * 64)


cdef void sum_parts(const double* parts, int T, Py_ssize_t D, floating* out,
                    Py_ssize_t stride=-1) noexcept nogil:
    """out[j] = Σ_t parts[t·stride + j] (the threads' partial sums in order; stride -1: D);
    nothing when out or parts is NULL."""
    cdef Py_ssize_t j
    cdef int t
    cdef double s
    if parts == NULL or out == NULL:
        return
    if stride < 0:
        stride = D
    for j in range(D):
        s = parts[j]
        for t in range(1, T):
            s += parts[t * stride + j]
        out[j] = <floating>s


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
