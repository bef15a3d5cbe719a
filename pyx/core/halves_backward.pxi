# Core: the row normalizer on 16-bit floats (float16, bfloat16), backward (LayerNorm, RMSNorm
# and their residual-add forms).
#
# A block of rows of g and x (and of the residual stream's gradient) is widened into a
# per-thread float32 scratch (core/halves.h), the float32 backward (norm_backward_rows,
# core/rows_backward.pxi) runs over the block there, and each row's dx is narrowed once,
# rounding to nearest even, straight into the 16-bit dx.  Blocks are whole multiples of four
# rows from the start of the thread's range, so the float32 sweeps see the same groups of four
# rows, and add to the parameter gradients in the same order, as over a float32 copy of the
# whole input: dx, dw and db are those of the float32 backward of the widened arrays, to the
# bit, without the widened copies.  Without a mask or a residual stream, and where the build
# has them (CYNORM_HALF_ROWS_BACKWARD), each thread's fours of rows are read in 16 bits and
# widened in registers instead, by core/rows_backward.h's sweeps instantiated on 16-bit rows
# (core/halves_sums.h), and only the last few rows go through scratch.

cdef extern from "core/halves_sums.h" nogil:
    bint HALF_ROWS_BACKWARD "CYNORM_HALF_ROWS_BACKWARD"
    void cynorm_ln_gx_sums_half(const uint16_t* g, const float* w, const uint16_t* x,
                                Py_ssize_t n, float mh, float ml, double* sg, double* sgx,
                                Py_ssize_t ahead_g, Py_ssize_t ahead_x, int kind) noexcept
    void cynorm_ln_paramgrads4_half(const uint16_t** g, const uint16_t** x, const float* mh,
                                    const float* ml, const float* rs, double* dw, double* db,
                                    Py_ssize_t D, const float* w, const float* af,
                                    const float* cf, uint16_t** dx, int kind) noexcept


cdef inline void widen_rows(const uint16_t* a, Py_ssize_t lda, Py_ssize_t r0, Py_ssize_t r1,
                            Py_ssize_t D, float* s, int kind) noexcept nogil:
    """Rows r0..r1 of the 16-bit a (rows lda apart) widened into s, D floats apart."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        cynorm_widen_half(a + i * lda, s + (i - r0) * D, D, kind)


cdef inline void narrow_rows(const float* s, uint16_t* a, Py_ssize_t lda, Py_ssize_t r0,
                             Py_ssize_t r1, Py_ssize_t D, int kind) noexcept nogil:
    """The rows of s (D floats apart) narrowed into rows r0..r1 of the 16-bit a."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        cynorm_narrow_half(s + (i - r0) * D, a + i * lda, D, kind)


cdef inline Py_ssize_t half_backward_rows(Py_ssize_t D, Py_ssize_t most) noexcept nogil:
    """Rows per widened block: HALF_BACKWARD_BYTES of float32 per array, a multiple of four,
    at least four; at most ``most`` (the most rows a thread's range holds: one block then
    covers it, and a few huge rows do not get scratch for four)."""
    cdef Py_ssize_t b = HALF_BACKWARD_BYTES // (4 * D) if D > 0 else 4
    return max(1, min(max(4, b - b % 4), most))


cdef void half_norm_backward_rows(const uint16_t* g, Py_ssize_t ldg, const uint16_t* x,
                                  Py_ssize_t ldx, uint16_t* dx, Py_ssize_t lddx, Py_ssize_t r0,
                                  Py_ssize_t r1, Py_ssize_t D, const float* w,
                                  const double* mean, const double* rstd, double* dw,
                                  double* db, const unsigned char* mask, bint centred,
                                  const uint16_t* gr, Py_ssize_t ldgr, float* scratch,
                                  Py_ssize_t B, int kind, bint stream) noexcept nogil:
    # scratch: this thread's B rows of D floats each for g, x and dx, then (gr) for gr; a
    # streamed dx row goes through a 16-bit row of scratch (at xs: its block is read by then)
    cdef float* gs = scratch
    cdef float* xs = scratch + B * D
    cdef float* ds = scratch + 2 * B * D
    cdef float* rs = scratch + 3 * B * D if gr != NULL else NULL
    cdef Py_ssize_t i0 = r0, i1, i, k
    cdef double rsd, sg = 0.0, sgx = 0.0
    cdef const uint16_t* g4[4]
    cdef const uint16_t* x4[4]
    cdef uint16_t* dx4[4]
    cdef float mh4[4]
    cdef float ml4[4]
    cdef float rs4[4]
    cdef float af4[4]
    cdef float cf4[4]
    if HALF_ROWS_BACKWARD and mask == NULL and gr == NULL:
        # norm_backward_rows' float32 fours of rows, on the 16-bit rows
        while i0 + 4 <= r1:
            for k in range(4):
                g4[k] = g + (i0 + k) * ldg
                x4[k] = x + (i0 + k) * ldx
                dx4[k] = dx + (i0 + k) * lddx
                rsd = rstd[i0 + k]
                split_mean(mean[i0 + k] if mean != NULL else 0.0, 0.0, &mh4[k], &ml4[k])
                rs4[k] = <float>rsd
                cynorm_ln_gx_sums_half(g4[k], w, x4[k], D, mh4[k], ml4[k], &sg, &sgx, 4 * ldg,
                                       4 * ldx, kind)
                dx_coefs(rsd, sg, sgx, D, centred, &af4[k], &cf4[k])
            cynorm_ln_paramgrads4_half(g4, x4, mh4, ml4, rs4, dw, db, D, w, af4, cf4, dx4, kind)
            i0 += 4
    while i0 < r1:
        i1 = min(i0 + B, r1)
        for i in range(i0, i1):
            if mask == NULL or mask[i]:   # padding rows: dx is 0 (or gr), g and x unread
                cynorm_widen_half(g + i * ldg, gs + (i - i0) * D, D, kind)
                cynorm_widen_half(x + i * ldx, xs + (i - i0) * D, D, kind)
            if gr != NULL:
                cynorm_widen_half(gr + i * ldgr, rs + (i - i0) * D, D, kind)
        norm_backward_rows(<const float*>gs, D, <const float*>xs, D, ds, D, 0, i1 - i0, D, w,
                           mean + i0 if mean != NULL else NULL, rstd + i0, dw, db,
                           mask + i0 if mask != NULL else NULL, False, centred,
                           <const float*>rs, D)
        for i in range(i0, i1):
            put_half_row(ds + (i - i0) * D, dx + i * lddx, <uint16_t*>xs, D, kind, stream)
        i0 = i1
    if stream:
        cynorm_sfence()


cdef run_half_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                            cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                            cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                            cnp.ndarray mask, bint centred, cnp.ndarray grad_residual,
                            int kind):
    """run_norm_backward for 16-bit data: g, x, dx (and grad_residual) are 16-bit arrays
    holding float16 (kind HALF_F16) or bfloat16 (HALF_BF16) bits; weight float32, 16-bit of
    the same kind, or None; grad_weight and grad_bias float32 (or None)."""
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldg = row_stride(g, M, D, False)
    cdef Py_ssize_t lddx = row_stride(dx, M, D, True), ldgr = 0
    cdef const void* w = half_param(weight, D, kind)
    cdef double* mp = float64_data(mean, M, False)
    cdef double* rp = float64_data(rstd, M, False)
    cdef void* gw = optional_data(grad_weight, D, 1)
    cdef void* gb = optional_data(grad_bias, D, 1)
    cdef const uint16_t* grp = NULL
    cdef const uint16_t* gp = <const uint16_t*>cnp.PyArray_DATA(g)
    cdef const uint16_t* xp = <const uint16_t*>cnp.PyArray_DATA(x)
    cdef uint16_t* dxp = <uint16_t*>cnp.PyArray_DATA(dx)
    cdef int T = max(1, n_threads), t
    cdef Py_ssize_t P = part_stride(D), B = half_backward_rows(D, (M + T - 1) // T)
    cdef Py_ssize_t per_thread
    cdef double* parts = NULL
    cdef double* dw = NULL
    cdef double* db = NULL
    cdef void* block = NULL
    cdef float* scratch = NULL
    cdef const unsigned char* mk = mask_data(mask, M)
    cdef bint stream = streamed(M * D * <Py_ssize_t>sizeof(uint16_t), T)
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(g) or not is_bits16(x) or not is_bits16(dx):
        raise TypeError("16-bit kernels take g, x and dx as 16-bit float (or uint16) arrays")
    if rp == NULL or (centred and mp == NULL):
        raise TypeError("backward: the saved statistics are missing")
    if grad_residual is not None:
        ldgr = row_stride(grad_residual, M, D, False)
        if not is_bits16(grad_residual):
            raise TypeError("grad_residual must have x's dtype")
        grp = <const uint16_t*>cnp.PyArray_DATA(grad_residual)
    if not centred:
        mp = NULL
    # per thread: 3 (with gr, 4) blocks of B rows of D floats, in whole 64-byte lines; then
    # a 16-bit weight widened (D floats)
    per_thread = ((4 if grp != NULL else 3) * B * D + 15) // 16 * 16
    scratch = <float*>malloc((T * per_thread + D + 16) * sizeof(float))
    if scratch == NULL:
        raise MemoryError()
    try:
        if w != NULL and is_bits16(weight):
            cynorm_widen_half(<const uint16_t*>w, scratch + T * per_thread, D, kind)
            w = scratch + T * per_thread
        if gw != NULL or gb != NULL:
            parts = aligned_parts(&block, 2 * T * P + 1)
            if parts == NULL:
                raise MemoryError()
            dw = parts if gw != NULL else NULL
            db = parts + T * P if gb != NULL else NULL
        with nogil:
            if M > 0:
                if T <= 1:
                    half_norm_backward_rows(gp, ldg, xp, ldx, dxp, lddx, 0, M, D,
                                            <const float*>w, mp, rp, dw, db, mk, centred, grp,
                                            ldgr, scratch, B, kind, stream)
                else:
                    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                        half_norm_backward_rows(gp, ldg, xp, ldx, dxp, lddx, chunk(M, t, T),
                                                chunk(M, t + 1, T), D, <const float*>w, mp, rp,
                                                dw + t * P if dw != NULL else NULL,
                                                db + t * P if db != NULL else NULL, mk, centred,
                                                grp, ldgr, scratch + t * per_thread, B, kind,
                                                stream)
            sum_parts(dw, T, D, <float*>gw, P)
            sum_parts(db, T, D, <float*>gb, P)
    finally:
        free(block)
        free(scratch)
