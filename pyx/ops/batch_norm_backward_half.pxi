# BatchNorm backward on 16-bit floats (float16, bfloat16): g and x read as 16-bit, dx written as
# 16-bit.  The float32 backward's passes (ops/batch_norm_backward.pxi) run over blocks of rows
# widened into a per-thread float32 scratch (core/halves_backward.pxi): in training first the
# sums, then the coefficients, then dx, narrowed once per element; in eval dx and the sums (when
# a parameter gradient asks for them) from the same widened block, in one pass.  The blocks are
# whole fours of rows from the start of each thread's range, so the sums are added in the
# float32 backward's order: dx, dw and db are those of the float32 backward of widened copies,
# to the bit.  The unmasked layouts are read in 16 bits and widened in registers instead (by
# rows: core/halves_sums.h; by columns: ops/batch_norm.h), with the same grouping of rows.

cdef extern from "ops/batch_norm.h" nogil:
    void cynorm_bn_colsums4_half(const uint16_t** g, const uint16_t** x, const float* m,
                                 double* sg, double* sgx, Py_ssize_t F, const float* k,
                                 uint16_t* d0, Py_ssize_t ld, int kind, float* scratch) noexcept
    void cynorm_bn_dx_vec_half(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                               Py_ssize_t n, const float* mh, const float* k1, const float* k2,
                               const float* k3, bint training, int kind) noexcept


cdef void half_bn_rows(const uint16_t* g, Py_ssize_t ldg, const uint16_t* x, Py_ssize_t ldx,
                       uint16_t* dx, Py_ssize_t lddx, Py_ssize_t r0, Py_ssize_t r1,
                       Py_ssize_t cols, Py_ssize_t C, bint by_rows, const double* mean,
                       const float* mean_col, double* parts, double* sg, double* sgx,
                       bint sums, const float* coef, bint training,
                       const unsigned char* mask, float* scratch, Py_ssize_t B,
                       int kind) noexcept nogil:
    """Rows r0..r1: with sums, their sums (by rows: per row into parts; by columns: added to
    sg and sgx, this thread's); with coef (not NULL), their dx.  Without a mask the rows are
    read in 16 bits, widened in registers: by rows a row at a time (cynorm_gx_sums_half,
    cynorm_bn_dx_half: the float32 row's bits), by columns four rows at a time
    (cynorm_bn_colsums4_half, cynorm_bn_dx_vec_half: bn_sums_columns' and bn_dx_range's
    bits), the last few rows as below; else B rows at a time widened into scratch."""
    cdef float* gs = scratch
    cdef float* xs = scratch + B * cols
    cdef float* ds = scratch + 2 * B * cols
    cdef Py_ssize_t i0 = r0, i1, c, k
    cdef const uint16_t* g4[4]
    cdef const uint16_t* x4[4]
    cdef bint same_sweep = sums and coef != NULL and not training
    if by_rows and mask == NULL:   # a row at a time, widened in registers (core/halves_sums.h)
        for i0 in range(r0, r1):
            c = row_feature(i0, C)
            if sums:
                cynorm_gx_sums_half(g + i0 * ldg, x + i0 * ldx, cols, mean[c], &parts[2 * i0],
                                    &parts[2 * i0 + 1], kind)
            if coef != NULL:
                cynorm_bn_dx_half(g + i0 * ldg, x + i0 * ldx, dx + i0 * lddx, cols, coef[c],
                                  coef[C + c], coef[2 * C + c], coef[3 * C + c], training,
                                  kind)
        return
    if not by_rows and mask == NULL:   # four rows at a time, widened in registers
        while i0 + 4 <= r1:
            for k in range(4):
                g4[k] = g + (i0 + k) * ldg
                x4[k] = x + (i0 + k) * ldx
            if sums:   # (eval: dx = k1·g in the same sweep)
                cynorm_bn_colsums4_half(g4, x4, mean_col, sg, sgx, cols,
                                        coef + cols if same_sweep else NULL,
                                        dx + i0 * lddx if same_sweep else NULL, lddx, kind,
                                        scratch)
            if coef != NULL and not same_sweep:
                for k in range(4):
                    cynorm_bn_dx_vec_half(g4[k], x4[k], dx + (i0 + k) * lddx, cols, coef,
                                          coef + cols, coef + 2 * cols, coef + 3 * cols,
                                          training, kind)
            i0 += 4
    while i0 < r1:
        i1 = min(i0 + B, r1)
        widen_rows(g, ldg, i0, i1, cols, gs, kind)
        widen_rows(x, ldx, i0, i1, cols, xs, kind)
        if sums and by_rows:
            bn_sums_rows(<const float*>gs, cols, <const float*>xs, cols, i0, i1, cols, C, mean,
                         parts, i0)
        elif sums:
            bn_sums_columns(<const float*>gs, cols, <const float*>xs, cols, i0, i1, cols,
                            mean_col, sg, sgx, mask, NULL, 0, NULL, False, i0, True)
        if coef != NULL:
            bn_dx_range(<const float*>gs, cols, <const float*>xs, cols, ds, cols, i0, i1, cols,
                        C, by_rows, coef, training, mask, False, i0)
            narrow_rows(ds, dx, lddx, i0, i1, cols, kind)
        i0 = i1


cdef void half_bn_pass(const uint16_t* g, Py_ssize_t ldg, const uint16_t* x, Py_ssize_t ldx,
                       uint16_t* dx, Py_ssize_t lddx, Py_ssize_t rows, Py_ssize_t cols,
                       Py_ssize_t C, bint by_rows, const double* mean, const float* mean_col,
                       double* parts, bint sums, const float* coef, bint training,
                       const unsigned char* mask, float* scratch, Py_ssize_t per_thread,
                       Py_ssize_t B, int kind, int T) noexcept nogil:
    """half_bn_rows over all rows, split among T threads (by columns, thread t's sums at
    parts + 2·t·cols, zeroed here)."""
    cdef Py_ssize_t t
    if sums and not by_rows:
        memset(parts, 0, 2 * T * cols * sizeof(double))
    if T <= 1:
        half_bn_rows(g, ldg, x, ldx, dx, lddx, 0, rows, cols, C, by_rows, mean, mean_col, parts,
                     parts, parts + cols, sums, coef, training, mask, scratch, B, kind)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        half_bn_rows(g, ldg, x, ldx, dx, lddx, chunk(rows, t, T), chunk(rows, t + 1, T), cols,
                     C, by_rows, mean, mean_col, parts, parts + 2 * t * cols,
                     parts + 2 * t * cols + cols, sums, coef, training, mask,
                     scratch + t * per_thread, B, kind)


cdef void half_grouped_rows(const uint16_t* g, Py_ssize_t ldg, const uint16_t* x,
                            Py_ssize_t ldx, uint16_t* dx, Py_ssize_t lddx, Py_ssize_t a0,
                            Py_ssize_t a1, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t L,
                            Py_ssize_t C, const double* mean, double* parts, const float* coef,
                            float* scratch, Py_ssize_t B, int kind) noexcept nogil:
    """Features c0..c1 of samples a0..a1 (by rows, training; as grouped_rows): their per-row
    sums into parts when coef is NULL, else their dx."""
    cdef Py_ssize_t a
    for a in range(a0, a1):
        half_bn_rows(g, ldg, x, ldx, dx, lddx, a * C + c0, a * C + c1, L, C, True, mean, NULL,
                     parts, NULL, NULL, coef == NULL, coef, True, NULL, scratch, B, kind)


cdef void half_bn_grouped(const uint16_t* g, Py_ssize_t ldg, const uint16_t* x,
                          Py_ssize_t ldx, uint16_t* dx, Py_ssize_t lddx, Py_ssize_t rows,
                          Py_ssize_t L, Py_ssize_t C, Py_ssize_t F, const double* mean,
                          const double* invstd, const float* w, double n, double* parts,
                          double* sums, float* coef, float* scratch, Py_ssize_t per_thread,
                          Py_ssize_t B, int kind, int T) noexcept nogil:
    """Training by rows, F features at a time (as _batch_norm_grouped): their sums, then
    their dx while their 16-bit rows are still in cache."""
    cdef Py_ssize_t A = rows // C, c0 = 0, c1, t
    cdef int step
    cdef const float* k
    while c0 < C:
        c1 = c0 + F if c0 + F < C else C
        for step in range(2):   # the group's sums (k NULL), then its dx
            k = NULL if step == 0 else coef
            if k != NULL:
                bn_reduce_sums(True, rows, L, C, T, parts, sums, c0, c1)
                bn_coefficients(L, C, True, mean, invstd, w, sums, n, True, coef, c0, c1)
            if T <= 1:
                half_grouped_rows(g, ldg, x, ldx, dx, lddx, 0, A, c0, c1, L, C, mean, parts, k,
                                  scratch, B, kind)
            else:
                for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                    half_grouped_rows(g, ldg, x, ldx, dx, lddx, chunk(A, t, T),
                                      chunk(A, t + 1, T), c0, c1, L, C, mean, parts, k,
                                      scratch + t * per_thread, B, kind)
        c0 = c1


cdef run_half_batch_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx,
                                  Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t C, bint by_rows,
                                  cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray weight,
                                  bint training, cnp.ndarray grad_weight,
                                  cnp.ndarray grad_bias, int n_threads, cnp.ndarray mask,
                                  int kind):
    """batch_norm_backward for 16-bit g, x and dx of one kind; weight float32 or of that kind,
    grad_weight and grad_bias float32 (or None)."""
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldg = row_stride(g, rows, cols, False)
    cdef Py_ssize_t lddx = row_stride(dx, rows, cols, True)
    cdef const void* w = half_param(weight, C, kind)
    cdef double* mp = float64_data(mean, C, False)
    cdef double* ip = float64_data(invstd, C, False)
    cdef void* gw = optional_data(grad_weight, C, 1)
    cdef void* gb = optional_data(grad_bias, C, 1)
    cdef bint want_sums = training or gw != NULL or gb != NULL
    cdef int T = max(1, n_threads)
    cdef Py_ssize_t off, K = C if by_rows else cols
    cdef Py_ssize_t B = half_backward_rows(cols, (rows + T - 1) // T)
    cdef Py_ssize_t per_thread = (3 * B * cols + 15) // 16 * 16
    cdef double n = bn_count(rows, cols, C, by_rows, mk)
    # training by rows on inputs larger than the cache: a group of features at a time, as
    # the float32 backward (its bits too)
    cdef bint grouped = (training and by_rows and 2 * rows * cols * 2 >= GROUP_MIN_BYTES
                         and group_features(rows // C, cols, 2) >= GROUP_MIN_FEATURES)
    cdef double* parts = NULL
    cdef double* sp = NULL
    cdef float* coef = NULL
    cdef float* mean_col = NULL
    cdef float* scratch = NULL
    cdef const uint16_t* gp = <const uint16_t*>cnp.PyArray_DATA(g)
    cdef const uint16_t* xp = <const uint16_t*>cnp.PyArray_DATA(x)
    cdef uint16_t* dxp = <uint16_t*>cnp.PyArray_DATA(dx)
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(g) or not is_bits16(x) or not is_bits16(dx) or mp == NULL or ip == NULL:
        raise TypeError("batch_norm_backward: inconsistent arrays")
    if not layout_fits(rows, cols, C, by_rows):
        raise ValueError("batch_norm_backward: inconsistent shape")
    if by_rows and mk != NULL:
        raise ValueError("batch_norm_backward: a row mask needs the column layout")
    # parts: the per-row or per-thread partial sums, then the sums (2, C); floats: the
    # coefficients (4, K), the columns' means, a 16-bit weight widened, the threads' scratch
    off = 2 * rows if by_rows else 2 * T * cols
    parts = <double*>malloc(sizeof(double) * (off + 2 * C))
    coef = <float*>malloc(sizeof(float) * (4 * K + cols + C + T * per_thread + 16))
    if parts == NULL or coef == NULL:
        free(parts)
        free(coef)
        raise MemoryError()
    mean_col = coef + 4 * K
    scratch = mean_col + cols + C
    if w != NULL and is_bits16(weight):
        cynorm_widen_half(<const uint16_t*>w, mean_col + cols, C, kind)
        w = mean_col + cols
    sp = parts + off if want_sums else NULL
    try:
        with nogil:
            if rows * cols == 0:
                memset(parts + off, 0, 2 * C * sizeof(double))
            else:
                if sp != NULL and not by_rows:
                    column_means(cols, C, mp, mean_col)
                if grouped:
                    half_bn_grouped(gp, ldg, xp, ldx, dxp, lddx, rows, cols, C,
                                    group_features(rows // C, cols, 2), mp, ip,
                                    <const float*>w, n, parts, sp, coef, scratch, per_thread, B,
                                    kind, T)
                elif training:   # the sums first: the coefficients need them
                    half_bn_pass(gp, ldg, xp, ldx, dxp, lddx, rows, cols, C, by_rows, mp,
                                 mean_col, parts, True, NULL, True, mk, scratch, per_thread, B,
                                 kind, T)
                    bn_total_sums(by_rows, rows, cols, C, T, mp, parts, sp, <float>0)
                if not grouped:
                    bn_coefficients(cols, C, by_rows, mp, ip, <const float*>w, sp, n, training,
                                    coef)
                    # dx, and in eval the sums from the same blocks
                    half_bn_pass(gp, ldg, xp, ldx, dxp, lddx, rows, cols, C, by_rows, mp,
                                 mean_col, parts, sp != NULL and not training, coef, training,
                                 mk, scratch, per_thread, B, kind, T)
                if sp != NULL and not training:
                    bn_total_sums(by_rows, rows, cols, C, T, mp, parts, sp, <float>0)
            bn_param_grads(C, parts + off, ip, <float*>gw, <float*>gb)
    finally:
        free(parts)
        free(coef)
