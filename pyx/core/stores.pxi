# Core: the store policy.  Whether an output row is written with streaming stores is decided
# here, once, by streamed() from the thresholds of the policy table; the streamed rows
# themselves are in core/stores.h.

cdef extern from "core/stores.h" nogil:
    # the output loops with streaming stores (outputs far larger than the cache)
    void cynorm_sfence() noexcept
    void cynorm_zero_nt_f(float* y, Py_ssize_t n) noexcept
    void cynorm_zero_nt_d(double* y, Py_ssize_t n) noexcept
    void cynorm_copy_nt_f(const float* x, float* y, Py_ssize_t n) noexcept
    void cynorm_copy_nt_d(const double* x, double* y, Py_ssize_t n) noexcept
    void cynorm_apply_nt_f(const float* x, float* y, Py_ssize_t n, float mh, float ml,
                           float rs, const float* w, const float* b) noexcept
    void cynorm_apply_nt_d(const double* x, double* y, Py_ssize_t n, double mh, double ml,
                           double rs, const double* w, const double* b) noexcept
    void cynorm_apply_nt_f_vec(const float* x, float* y, Py_ssize_t n, const float* mh,
                               const float* sc, const float* sh) noexcept
    void cynorm_apply_nt_d_vec(const double* x, double* y, Py_ssize_t n, const double* mh,
                               const double* sc, const double* sh) noexcept
    void cynorm_apply_nt_f_scalar(const float* x, float* y, Py_ssize_t n, float mh, float sc,
                                  float sh) noexcept
    void cynorm_apply_nt_d_scalar(const double* x, double* y, Py_ssize_t n, double mh,
                                  double sc, double sh) noexcept

cdef inline bint streamed(Py_ssize_t nbytes, int n_threads) noexcept nogil:
    """Whether an output of nbytes written by n_threads threads takes streaming stores."""
    return nbytes >= (STREAM_BYTES_ONE_THREAD if n_threads <= 1 else STREAM_BYTES)


cdef inline void zero_row(floating* y, Py_ssize_t n, bint stream=False) noexcept nogil:
    if stream:
        if floating is float:
            cynorm_zero_nt_f(y, n)
        else:
            cynorm_zero_nt_d(y, n)
        return
    memset(y, 0, n * sizeof(floating))
