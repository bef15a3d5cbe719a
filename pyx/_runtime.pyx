# cynorm._runtime: what the kernels' callers need once per process, built once (not per ISA).
#
# - the OpenMP thread count and the CPU feature check (which kernels build may run here);
# - the front end's fast argument checks through NumPy's C API (plain, plain_size,
#   layer_norm_shape);
# - the outputs: fresh arrays for the kernels to write, large ones from the output cache
#   (_pool.h, one cache for the process), and its controls.
#
# The kernels modules (_kernels*.pyx, one per instruction set) hold only kernels.

cimport numpy as cnp

from _common cimport omp_get_max_threads, cynorm_cpu_supports

cnp.import_array()

def omp_max_threads():
    """omp_get_max_threads() of the calling thread (1 without OpenMP).

    It honours OMP_NUM_THREADS and limits set through threadpoolctl.
    """
    return omp_get_max_threads()


def cpu_supports(int level):
    """True when this CPU runs kernels built for ISA level 0 (baseline), 1 (AVX2) or 2 (AVX-512)."""
    return bool(cynorm_cpu_supports(level))


def plain(object a, object dtype, tuple shape):
    """True when a is an ndarray of exactly this dtype object and shape, C-contiguous: what the
    kernels read as is.  The front end's fast check of parameters, read through the C API (the
    same test in Python costs four attribute lookups an array; benchmarks/RESULTS.md, item 31)."""
    cdef cnp.ndarray arr
    cdef Py_ssize_t k, n = len(shape)
    if type(a) is not cnp.ndarray:
        return False
    arr = <cnp.ndarray>a
    if <object>cnp.PyArray_DESCR(arr) is not dtype or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        return False
    if cnp.PyArray_NDIM(arr) != n:
        return False
    for k in range(n):
        if cnp.PyArray_DIMS(arr)[k] != <Py_ssize_t>shape[k]:
            return False
    return True


def plain_size(object a, object dtype, Py_ssize_t n):
    """As plain, for n elements in any shape (the saved statistics: the kernels read n
    contiguous values)."""
    if type(a) is not cnp.ndarray:
        return False
    return (<object>cnp.PyArray_DESCR(<cnp.ndarray>a) is dtype
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_SIZE(<cnp.ndarray>a) == n)


cdef object F32 = cnp.PyArray_DescrFromType(cnp.NPY_FLOAT)
cdef object F64 = cnp.PyArray_DescrFromType(cnp.NPY_DOUBLE)
cdef object F16 = cnp.PyArray_DescrFromType(cnp.NPY_FLOAT16)
cdef object BF16 = F64  # ml_dtypes' bfloat16 once the front end has recognized it (F64 before)


def note_bfloat16(object dtype):
    """Record ml_dtypes' bfloat16 dtype object (the front end's is_bfloat16, at the first one
    it recognizes): layer_norm_shape takes it from then on."""
    global BF16
    BF16 = dtype


def layer_norm_shape(object x, object normalized_shape):
    """The front end's fast check of a LayerNorm input: (dtype, normalized_shape as a tuple,
    rows, cols) when x is an ndarray of exactly the float32, float64, float16 or (once noted)
    bfloat16 dtype object and
    normalized_shape an int, or a tuple of one int, equal to x's last dimension and not 0;
    else None, and the caller takes its general checks (which also raise the errors).  The
    same steps in compiled Python cost more (attribute lookups, tuple slices; RESULTS item 46)."""
    cdef cnp.ndarray arr
    cdef object dt, n_obj
    cdef int nd
    cdef Py_ssize_t n
    if type(x) is not cnp.ndarray:
        return None
    arr = <cnp.ndarray>x
    dt = <object>cnp.PyArray_DESCR(arr)
    nd = cnp.PyArray_NDIM(arr)
    if (dt is not F32 and dt is not F64 and dt is not F16 and dt is not BF16) or nd == 0:
        return None
    n = cnp.PyArray_DIMS(arr)[nd - 1]
    if n == 0:
        return None
    if type(normalized_shape) is int:
        n_obj = normalized_shape
    elif type(normalized_shape) is tuple and len(<tuple>normalized_shape) == 1:
        n_obj = (<tuple>normalized_shape)[0]
        if type(n_obj) is not int:
            return None
    else:
        return None
    if n_obj != n:
        return None
    return (dt, ((n_obj,) if type(normalized_shape) is int else normalized_shape),
            cnp.PyArray_SIZE(arr) // n, n)


# ---------------------------------------------------------------------------------------------
# Outputs.  Large ones come from the output cache (_pool.h): buffers NumPy frees are kept, up to
# a byte limit, and handed to the next output of about their size with their pages mapped.
#
cdef extern from "_pool.h":
    object cynorm_pool_empty(int nd, cnp.npy_intp* dims, int typenum, size_t phase)
    size_t cynorm_pool_set_limit(size_t limit) noexcept
    void cynorm_pool_info(size_t* info) noexcept
    size_t cynorm_pool_limit() noexcept

cdef extern from "policy.h":
    enum:
        CACHED_OUTPUT_MIN "CYNORM_CACHED_OUTPUT_MIN"
        SERIAL_BELOW "CYNORM_SERIAL_BELOW"
        BATCH_NORM_SERIAL_BELOW "CYNORM_BATCH_NORM_SERIAL_BELOW"
        ROW_PATH_MIN "CYNORM_ROW_PATH_MIN"
        COLUMN_BLOCK_BYTES "CYNORM_COLUMN_BLOCK_BYTES"

# The policy table's thresholds that the Python front end applies (pyx/policy.h says why).
POLICY = {
    "serial_below": SERIAL_BELOW,
    "batch_norm_serial_below": BATCH_NORM_SERIAL_BELOW,
    "row_path_min": ROW_PATH_MIN,
    "column_block_bytes": COLUMN_BLOCK_BYTES,
    "cached_output_min": CACHED_OUTPUT_MIN,
}


cdef bint cached(int nd, cnp.npy_intp* dims, Py_ssize_t itemsize) noexcept:
    """Whether an output of this shape comes from the output cache: large, and the cache on."""
    cdef Py_ssize_t k, nbytes = itemsize
    if not cynorm_pool_limit():
        return False
    for k in range(nd):
        nbytes *= dims[k]
    return nbytes >= CACHED_OUTPUT_MIN


cdef size_t line_phase(object like, Py_ssize_t itemsize):
    """Where the data of the array the kernel reads (like; None: 0) starts within its 64-byte
    line, for an output of this itemsize to start at the same place (0 if that would leave the
    output unaligned for its items)."""
    cdef size_t p
    if like is None:
        return 0
    p = <size_t>cnp.PyArray_DATA(<cnp.ndarray>like) & 63
    return 0 if p % <size_t>itemsize else p


cdef object new_array(int nd, cnp.npy_intp* dims, int t, Py_ssize_t itemsize, object like):
    """An uninitialized C-contiguous array: from the output cache when it is large (and the
    cache is on), starting where like starts in its cache line, else plain PyArray_EMPTY."""
    if cached(nd, dims, itemsize):
        return cynorm_pool_empty(nd, dims, t, line_phase(like, itemsize))
    return cnp.PyArray_EMPTY(nd, dims, t, 0)


cdef int tuple_dims(tuple shape, cnp.npy_intp* dims) except -1:
    """shape into dims (room for 64); returns the number of dimensions."""
    cdef int k, nd = len(shape)
    if nd > 64:
        raise ValueError("too many dimensions")
    for k in range(nd):
        dims[k] = shape[k]
    return nd


def empty(tuple shape, cnp.dtype dtype, cnp.ndarray like=None):
    """np.empty(shape, dtype) for a kernel's output (the front end has checked the shape):
    large outputs come from the output cache, placed in their lines as like, the input."""
    cdef cnp.npy_intp dims[64]
    cdef int nd = tuple_dims(shape, dims)
    return new_array(nd, dims, dtype.type_num, dtype.itemsize, like)


def masked_output(tuple shape, cnp.dtype dtype, cnp.ndarray like=None):
    """A fresh output for a call with a padding mask: (array, whether the kernel must write the
    padding rows' zeros).  From the output cache when it is large (mapped already; the kernel
    writes the zeros), else zeroed (untouched zero pages cost no fault; the kernel leaves the
    padding rows alone)."""
    cdef cnp.npy_intp dims[64]
    cdef int nd = tuple_dims(shape, dims)
    if cached(nd, dims, dtype.itemsize):
        return cynorm_pool_empty(nd, dims, dtype.type_num, line_phase(like, dtype.itemsize)), True
    return cnp.PyArray_ZEROS(nd, dims, dtype.type_num, 0), False


def set_output_cache(Py_ssize_t nbytes):
    """Set how many bytes of freed large outputs are kept for reuse (0: none); blocks beyond
    the new limit are freed at once.  Returns the previous limit."""
    if nbytes < 0:
        raise ValueError(f"the output cache limit must be >= 0 bytes, got {nbytes}")
    return cynorm_pool_set_limit(<size_t>nbytes)


def output_cache_info():
    """The output cache's state: limit and held bytes, held blocks, hits and misses."""
    cdef size_t info[5]
    cynorm_pool_info(info)
    return {"limit": info[0], "held": info[1], "blocks": info[2], "hits": info[3],
            "misses": info[4], "min_size": CACHED_OUTPUT_MIN}


def grad_outputs(cnp.ndarray x, cnp.dtype dtype, tuple param_shape, bint weight, bint bias):
    """A backward call's fresh outputs, through the C API (np.empty costs more an array
    from Python): (grad_input of x's shape, grad_weight and grad_bias of param_shape, each None
    unless asked for), all of this dtype."""
    cdef cnp.npy_intp dims[64]
    cdef int nd = tuple_dims(param_shape, dims), t = dtype.type_num
    return (new_array(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), t, dtype.itemsize, x),
            cnp.PyArray_EMPTY(nd, dims, t, 0) if weight else None,
            cnp.PyArray_EMPTY(nd, dims, t, 0) if bias else None)
