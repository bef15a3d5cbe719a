# Core: the overflow rescue.  Statistics beyond these thresholds are recomputed on data
# scaled by a power of two: the row norms (LayerNorm, RMSNorm) in the kernel, rescaled_row in
# core/rows.pxi on scaled_copy below; BatchNorm and the moments on the Python side
# (_batch_norm._rescaled, which reads FLOAT32_BIG_M2), the group norms too (_groups._scaled,
# which reads RSTD_MAX).

# Below this M2 (2^-900) the squares of a float64 row may have lost bits to underflow.
cdef double TINY_M2 = 1.2e-271


# Above this M2 ((FLT_MAX / 2)^2) a float32 deviation x - mean may overflow float32.
cdef double F32_BIG_M2 = 2.89e76


# the same threshold for the Python side (functional._rescaled)
FLOAT32_BIG_M2 = F32_BIG_M2


# Below this variance (4 / FLT_MAX^2) 1 / sqrt(var + eps) overflows float32.
cdef double F32_TINY_VAR = 3.4e-77


# The group norms (ops/group_norm.pxi) redo a sample on x·2^-k (in Python, _groups._scaled)
# when an rstd lies beyond these: the coefficients rstd·w of the forward and rstd³ of the
# backward must stay exact in the compute dtype.
cdef double F32_RSTD_MAX = 1e15
cdef double F64_RSTD_MAX = 1e140
RSTD_MAX = {"float32": F32_RSTD_MAX, "float64": F64_RSTD_MAX}


cdef inline bint rstd_out_of_range(double rstd, bint f32) noexcept nogil:
    """Not within [1 / max, max] (NaN included): a sample to redo scaled."""
    cdef double m = F32_RSTD_MAX if f32 else F64_RSTD_MAX
    return not (rstd >= 1.0 / m and rstd <= m)


cdef floating* scaled_copy(const floating* x, Py_ssize_t n, int* k) noexcept nogil:
    """A new copy of the finite row x times 2^k (exact for a power of two), k chosen to make
    its largest element 1 <= |x| < 2; the caller frees it.  NULL (nothing to rescue) for rows
    of zeros, rows holding inf or NaN, rows already of unit size (no recursion), or when no
    scratch memory is left."""
    cdef double amax = 0.0, a
    cdef floating* buf
    cdef Py_ssize_t j
    for j in range(n):
        a = fabs(<double>x[j])
        if not a <= 1.7976931348623157e308:
            return NULL
        if a > amax:
            amax = a
    if amax == 0.0:
        return NULL
    k[0] = -ilogb(amax)
    if k[0] == 0:
        return NULL
    buf = <floating*>malloc(n * sizeof(floating))
    if buf == NULL:
        return NULL
    for j in range(n):
        buf[j] = <floating>ldexp(<double>x[j], k[0])
    return buf
