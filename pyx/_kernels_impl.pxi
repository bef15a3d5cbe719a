# Compiled kernels of cynorm.
#
# Kernels: moments, LayerNorm forward and BatchNorm normalization.
#
# Accumulators
# ------------
# All statistics are accumulated in float64, whatever the input dtype, and kept in float64
# (count, mean, M2).  A block of at most ``BLOCK`` contiguous elements gets its mean and M2 by a
# corrected two-pass while it sits in L1 (``LANES`` independent partial sums, so the compiler can
# vectorize without reassociating); blocks are merged with Chan's pairwise formula.
#
# The normalized output is computed in the input dtype as ``((x - m_hi) - m_lo) * scale + shift``
# where ``m_hi + m_lo`` is the float64 mean split into two numbers of the input dtype: the first
# subtraction is exact for data far from zero, so float32 output keeps its accuracy even when the
# mean lies 1e6 standard deviations from zero.
#
# Python validates every argument before calling in here: the kernels trust shapes and do no checks.
#
# This is the body of every kernels module: cynorm._kernels (the platform's baseline ISA) and
# its AVX2 / AVX-512 builds are this one file compiled with different flags (setup.py), and
# cynorm/_isa.py picks one at import from the CPU's features.

cimport cython
from cython.parallel cimport prange
from libc.math cimport sqrt, isinf, NAN

from _common cimport (floating, omp_get_max_threads, cynorm_cpu_supports, CYNORM_HAVE_OPENMP,
                     CYNORM_BUILD_FLAGS)

cdef enum:
    LANES = 16      # independent partial sums: two AVX-512 or four AVX2 registers of float64
    BLOCK = 2048    # elements per block of the row moments: 16 KiB of float64, fits L1


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(CYNORM_HAVE_OPENMP)


def omp_max_threads():
    """omp_get_max_threads() of the calling thread (1 without OpenMP).

    It honours OMP_NUM_THREADS and limits set through threadpoolctl.
    """
    return omp_get_max_threads()


def cpu_supports(int level):
    """True when this CPU runs kernels built for ISA level 0 (baseline), 1 (AVX2) or 2 (AVX-512)."""
    return bool(cynorm_cpu_supports(level))


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

cdef inline void block_moments(const floating* x, Py_ssize_t n, double* hi, double* lo,
                               double* m2) noexcept nogil:
    """Mean (hi + lo) and M2 of x[0:n], 0 < n <= BLOCK, by a corrected two-pass."""
    cdef double acc[LANES]
    cdef Py_ssize_t i, k, v
    cdef Py_ssize_t nv = n - n % LANES
    cdef const floating* p
    cdef double s = 0.0, q = 0.0, c = 0.0, m, d, inv_n = 1.0 / n

    for k in range(LANES):
        acc[k] = 0.0
    for v in range(nv // LANES):
        p = x + v * LANES
        for k in range(LANES):
            acc[k] += p[k]
    for k in range(LANES):
        s += acc[k]
    for i in range(nv, n):
        s += x[i]
    m = s * inv_n

    # One reduction per loop: GCC vectorizes these but not a loop that carries two.
    for k in range(LANES):
        acc[k] = 0.0
    for v in range(nv // LANES):
        p = x + v * LANES
        for k in range(LANES):
            acc[k] += p[k] - m
    for k in range(LANES):
        c += acc[k]
    for k in range(LANES):
        acc[k] = 0.0
    for v in range(nv // LANES):
        p = x + v * LANES
        for k in range(LANES):
            acc[k] += (p[k] - m) * (p[k] - m)
    for k in range(LANES):
        q += acc[k]
    for i in range(nv, n):
        d = x[i] - m
        c += d
        q += d * d
    # Σ(x - m) is zero in exact arithmetic; what is left is the rounding of m.
    hi[0] = m
    lo[0] = c * inv_n
    q = q - c * c * inv_n
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
    m_hi[0] = <floating>(hi + lo)
    m_lo[0] = <floating>((hi - <double>m_hi[0]) + lo)


cdef inline void layer_norm_row(const floating* x, floating* y, Py_ssize_t n,
                                const floating* w, const floating* b, double eps,
                                double* mean_out, double* rstd_out) noexcept nogil:
    cdef double hi = 0.0, lo = 0.0, m2 = 0.0, rstd
    cdef floating mh, ml, rs
    cdef Py_ssize_t j
    row_moments(x, n, &hi, &lo, &m2)
    rstd = 1.0 / sqrt(m2 / n + eps)
    if mean_out != NULL:
        mean_out[0] = hi + lo
        rstd_out[0] = rstd
    split_mean(hi, lo, &mh, &ml)
    rs = <floating>rstd
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


cdef inline void normalize_row_scalar(const floating* x, floating* y, Py_ssize_t n,
                                      floating mh, floating ml, floating scale,
                                      floating shift) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        y[j] = ((x[j] - mh) - ml) * scale + shift


cdef inline void normalize_row_vector(const floating* x, floating* y, Py_ssize_t n,
                                      const floating* mh, const floating* ml,
                                      const floating* scale, const floating* shift) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        y[j] = ((x[j] - mh[j]) - ml[j]) * scale[j] + shift[j]


cdef void column_chunk_moments(const floating* x, Py_ssize_t ld, Py_ssize_t r0, Py_ssize_t r1,
                               Py_ssize_t F, Py_ssize_t rows_per_block, double* count,
                               double* hi, double* lo, double* m2, double* s, double* c,
                               double* q) noexcept nogil:
    """Per-column moments of rows r0..r1 of a row-major (rows, F) array with row stride ld.

    Rows are taken in blocks that stay in cache; each block gets a corrected two-pass along the
    contiguous feature axis and is merged into the running moments by Chan's formula.  The
    first block's means become the shifts hi; lo and M2 accumulate relative to them.
    """
    cdef Py_ssize_t rb = r0, re, r, f
    cdef const floating* row
    cdef double nb, n, inv_nb, wa, wb, d, rel, m2b, delta
    count[0] = 0.0
    for f in range(F):
        lo[f] = 0.0
        m2[f] = 0.0
    while rb < r1:
        re = rb + rows_per_block if rb + rows_per_block < r1 else r1
        nb = <double>(re - rb)
        inv_nb = 1.0 / nb
        for f in range(F):
            s[f] = 0.0
            c[f] = 0.0
            q[f] = 0.0
        for r in range(rb, re):
            row = x + r * ld
            for f in range(F):
                s[f] += row[f]
        for f in range(F):
            s[f] *= inv_nb
        for r in range(rb, re):
            row = x + r * ld
            for f in range(F):
                d = row[f] - s[f]
                c[f] += d
                q[f] += d * d
        if count[0] == 0:
            for f in range(F):
                hi[f] = s[f]
        n = count[0] + nb
        wb = nb / n
        wa = count[0] * wb
        for f in range(F):
            rel = (s[f] - hi[f]) + c[f] * inv_nb
            m2b = q[f] - c[f] * c[f] * inv_nb
            m2b = m2b if not m2b < 0.0 else 0.0
            delta = rel - lo[f]
            lo[f] += delta * wb
            m2[f] += m2b + delta * delta * wa
        count[0] = n
        rb = re


# ---------------------------------------------------------------------------------------------
# Fused implementations, called through the dtype dispatchers below.

cdef void _layer_norm(const floating[:, ::1] x, floating[:, ::1] y,
                      const floating[::1] weight, const floating[::1] bias,
                      double[::1] mean, double[::1] rstd, double eps, int n_threads):
    cdef Py_ssize_t i, M = x.shape[0], D = x.shape[1]
    cdef const floating* wp = NULL
    cdef const floating* bp = NULL
    cdef bint keep = mean is not None
    if weight is not None:
        wp = &weight[0]
    if bias is not None:
        bp = &bias[0]
    with nogil:
        for i in prange(M, num_threads=n_threads, use_threads_if=n_threads > 1, schedule="static"):
            layer_norm_row(&x[i, 0], &y[i, 0], D, wp, bp, eps,
                           &mean[i] if keep else NULL, &rstd[i] if keep else NULL)


cdef void _row_moments(const floating[:, ::1] x, double[::1] hi, double[::1] lo, double[::1] m2,
                       int n_threads):
    cdef Py_ssize_t i, M = x.shape[0], L = x.shape[1]
    with nogil:
        for i in prange(M, num_threads=n_threads, use_threads_if=n_threads > 1, schedule="static"):
            row_moments(&x[i, 0], L, &hi[i], &lo[i], &m2[i])


cdef void _column_moments(const floating[:, ::1] x, double[::1] count, double[:, ::1] hi,
                          double[:, ::1] lo, double[:, ::1] m2, double[:, :, ::1] scratch, Py_ssize_t rows_per_block):
    cdef Py_ssize_t t, T = count.shape[0], R = x.shape[0], F = x.shape[1]
    cdef Py_ssize_t ld = x.strides[0] // sizeof(floating)
    cdef int n_threads = <int>T
    with nogil:
        for t in prange(T, num_threads=n_threads, use_threads_if=n_threads > 1, schedule="static", chunksize=1):
            column_chunk_moments(&x[0, 0], ld, (R * t) // T, (R * (t + 1)) // T, F, rows_per_block,
                                 &count[t], &hi[t, 0], &lo[t, 0], &m2[t, 0],
                                 &scratch[t, 0, 0], &scratch[t, 1, 0], &scratch[t, 2, 0])


cdef void _normalize_rows(const floating[:, ::1] x, floating[:, ::1] y,
                          const floating[:, ::1] params, int n_threads):
    # params rows: m_hi, m_lo, scale, shift; row i of x belongs to channel i % C
    cdef Py_ssize_t i, c, M = x.shape[0], L = x.shape[1], C = params.shape[1]
    with nogil:
        for i in prange(M, num_threads=n_threads, use_threads_if=n_threads > 1, schedule="static"):
            c = i % C
            normalize_row_scalar(&x[i, 0], &y[i, 0], L, params[0, c], params[1, c],
                                 params[2, c], params[3, c])


cdef void _normalize_columns(const floating[:, ::1] x, floating[:, ::1] y,
                             const floating[:, ::1] params, int n_threads):
    cdef Py_ssize_t i, M = x.shape[0], F = x.shape[1]
    with nogil:
        for i in prange(M, num_threads=n_threads, use_threads_if=n_threads > 1, schedule="static"):
            normalize_row_vector(&x[i, 0], &y[i, 0], F, &params[0, 0], &params[1, 0],
                                 &params[2, 0], &params[3, 0])


# ---------------------------------------------------------------------------------------------
# Python entry points: one dtype test per call, then the specialised kernel.  Arrays arrive
# validated (dtype float32 or float64, shapes consistent, inner axis contiguous).

def layer_norm(x, y, weight, bias, mean, rstd, double eps, int n_threads):
    """y[i] = (x[i] - mean_i) * rstd_i * weight + bias for each row i of the 2-D x.

    mean and rstd (float64, shape (rows,)) receive the statistics unless they are None.
    """
    if x.dtype.itemsize == 4:
        _layer_norm[cython.float](x, y, weight, bias, mean, rstd, eps, n_threads)
    else:
        _layer_norm[cython.double](x, y, weight, bias, mean, rstd, eps, n_threads)


def row_moments_into(x, hi, lo, m2, int n_threads):
    """Mean (hi[i] + lo[i]) and M2 m2[i] of row i of the 2-D x (rows of x.shape[1] elements)."""
    if x.dtype.itemsize == 4:
        _row_moments[cython.float](x, hi, lo, m2, n_threads)
    else:
        _row_moments[cython.double](x, hi, lo, m2, n_threads)


def column_moments_into(x, count, hi, lo, m2, scratch, Py_ssize_t rows_per_block):
    """Partial column moments of the 2-D x over len(count) contiguous row chunks, one per thread.

    count (T,), mean hi + lo (T, F) and m2 (T, F) receive the moments of each chunk;
    scratch is (T, 3, F).
    """
    if x.dtype.itemsize == 4:
        _column_moments[cython.float](x, count, hi, lo, m2, scratch, rows_per_block)
    else:
        _column_moments[cython.double](x, count, hi, lo, m2, scratch, rows_per_block)


def merge_moments(const double[::1] count, const double[:, ::1] hi, const double[:, ::1] lo,
                  const double[:, ::1] m2, double[::1] out_hi, double[::1] out_lo,
                  double[::1] out_m2):
    """Merge G groups of per-feature moments (count (G,); hi, lo, m2 (G, F)) into (F,) arrays.

    Chan's formula, relative to the first non-empty group's hi.  Returns the total count
    (0, with zeros written, when every group is empty).
    """
    cdef Py_ssize_t g, f, G = hi.shape[0], F = hi.shape[1]
    cdef double n = 0.0, nb, wa, wb, delta
    with nogil:
        for f in range(F):
            out_hi[f] = 0.0
            out_lo[f] = 0.0
            out_m2[f] = 0.0
        for g in range(G):
            nb = count[g]
            if nb == 0:
                continue
            if n == 0:
                for f in range(F):
                    out_hi[f] = hi[g, f]
                    out_lo[f] = lo[g, f]
                    out_m2[f] = m2[g, f]
                n = nb
                continue
            wb = nb / (n + nb)
            wa = n * wb
            for f in range(F):
                delta = ((hi[g, f] - out_hi[f]) + lo[g, f]) - out_lo[f]
                out_lo[f] += delta * wb
                out_m2[f] += m2[g, f] + delta * delta * wa
            n += nb
    return n


def normalize_rows(x, y, params, int n_threads):
    """y[i, :] = ((x[i, :] - m_hi[c]) - m_lo[c]) * scale[c] + shift[c] with c = i % C.

    params is (4, C): m_hi, m_lo, scale, shift, in the dtype of x.
    """
    if x.dtype.itemsize == 4:
        _normalize_rows[cython.float](x, y, params, n_threads)
    else:
        _normalize_rows[cython.double](x, y, params, n_threads)


def normalize_columns(x, y, params, int n_threads):
    """y[i, f] = ((x[i, f] - m_hi[f]) - m_lo[f]) * scale[f] + shift[f]; params is (4, F)."""
    if x.dtype.itemsize == 4:
        _normalize_columns[cython.float](x, y, params, n_threads)
    else:
        _normalize_columns[cython.double](x, y, params, n_threads)



cdef void _batch_norm_params(const double[::1] hi, const double[::1] lo, const double[::1] var,
                             const double[::1] w, const double[::1] b, double eps,
                             floating[:, ::1] params):
    cdef Py_ssize_t c, C = hi.shape[0]
    cdef double invstd
    cdef floating mh, ml
    for c in range(C):
        invstd = 1.0 / sqrt(var[c] + eps)
        if isinf(invstd):
            invstd = NAN
        split_mean(hi[c], lo[c], &mh, &ml)
        params[0, c] = mh
        params[1, c] = ml
        params[2, c] = <floating>(invstd * w[c]) if w is not None else <floating>invstd
        params[3, c] = <floating>b[c] if b is not None else 0


def batch_norm_params(hi, lo, var, weight, bias, double eps, params):
    """Fill params (4, C) with m_hi, m_lo, scale = weight / sqrt(var + eps) and shift = bias.

    The mean is hi + lo; hi, lo, var, weight and bias are float64 arrays of length C (weight
    and bias may be None).
    A channel whose var + eps is zero has no defined output (0/0): its scale is NaN, where
    torch also gives NaN.
    """
    if params.dtype.itemsize == 4:
        _batch_norm_params[cython.float](hi, lo, var, weight, bias, eps, params)
    else:
        _batch_norm_params[cython.double](hi, lo, var, weight, bias, eps, params)
