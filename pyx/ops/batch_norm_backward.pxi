# BatchNorm backward.  Per feature over its n elements:
#     training: dx = w·invstd·(g - Σg/n - (x - mean)·invstd²·Σg(x - mean)/n)
#     eval:     dx = w·invstd·g      (the running statistics are constants)
#     dw = invstd·Σg(x - mean), db = Σg
# Sums in float64; the column sweeps of four rows are in ops/batch_norm.h.

cdef extern from "ops/batch_norm.h" nogil:
    void cynorm_bn_colsums4_f(const float* g0, const float* g1, const float* g2,
                              const float* g3, const float* x0, const float* x1,
                              const float* x2, const float* x3, const float* m, double* sg,
                              double* sgx, Py_ssize_t F, const float* k, float* d0,
                              Py_ssize_t ld, int nt) noexcept
    void cynorm_bn_colsums4_d(const double* g0, const double* g1, const double* g2,
                              const double* g3, const double* x0, const double* x1,
                              const double* x2, const double* x3, const double* m, double* sg,
                              double* sgx, Py_ssize_t F, const double* k, double* d0,
                              double* d1, double* d2, double* d3) noexcept
    void cynorm_bn_dx_nt_f_vec(const float* g, const float* x, float* dx, Py_ssize_t n,
                               const float* mh, const float* k1, const float* k2,
                               const float* k3) noexcept
    void cynorm_bn_dx_nt_d_vec(const double* g, const double* x, double* dx, Py_ssize_t n,
                               const double* mh, const double* k1, const double* k2,
                               const double* k3) noexcept
    void cynorm_bn_dx_nt_f_scalar(const float* g, const float* x, float* dx, Py_ssize_t n,
                                  float mh, float k1, float k2, float k3) noexcept
    void cynorm_bn_dx_nt_d_scalar(const double* g, const double* x, double* dx, Py_ssize_t n,
                                  double mh, double k1, double k2, double k3) noexcept

cdef inline void bn_dx_row(const floating* g, const floating* x, floating* dx, Py_ssize_t n,
                           floating mh, floating k1, floating k2, floating k3,
                           bint training, bint stream=False) noexcept nogil:
    # one feature: dx = k1·g + k2·(x - mh) + k3 (training; streaming stores with stream),
    # k1·g (eval)
    cdef Py_ssize_t j
    if training and stream:
        if floating is float:
            cynorm_bn_dx_nt_f_scalar(g, x, dx, n, mh, k1, k2, k3)
        else:
            cynorm_bn_dx_nt_d_scalar(g, x, dx, n, mh, k1, k2, k3)
    elif training:
        for j in range(n):
            dx[j] = k1 * g[j] + (k2 * (x[j] - mh) + k3)
    else:
        for j in range(n):
            dx[j] = k1 * g[j]


cdef inline void bn_dx_vector(const floating* g, const floating* x, floating* dx, Py_ssize_t n,
                              const floating* mh, const floating* k1, const floating* k2,
                              const floating* k3, bint training,
                              bint stream=False) noexcept nogil:
    cdef Py_ssize_t j
    if training and stream:
        if floating is float:
            cynorm_bn_dx_nt_f_vec(g, x, dx, n, mh, k1, k2, k3)
        else:
            cynorm_bn_dx_nt_d_vec(g, x, dx, n, mh, k1, k2, k3)
    elif training:
        for j in range(n):
            dx[j] = k1[j] * g[j] + (k2[j] * (x[j] - mh[j]) + k3[j])
    else:
        for j in range(n):
            dx[j] = k1[j] * g[j]


cdef inline bint bn_dx_streamed(Py_ssize_t nbytes, int T) noexcept nogil:
    """Whether BatchNorm's dx takes streaming stores: on one thread, from the size the forward
    streams at up to the size every thread count streams at.  Beyond that (dx far larger than
    the cache) they measured no faster than normal stores, on 1 and 2 threads, for eval and
    training (benchmarks/RESULTS.md, item 37)."""
    return T <= 1 and STREAM_BYTES_ONE_THREAD <= nbytes < STREAM_BYTES


cdef void bn_sums_rows(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L, Py_ssize_t C,
                       const double* mean, double* parts, Py_ssize_t base=0) noexcept nogil:
    """Σg and Σg·(x - mean) of rows r0..r1 (row i: feature i % C) into parts[2i], parts[2i+1].
    g and x start at row base (a block of widened rows: core/halves_backward.pxi)."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        gx_sums(g + (i - base) * ldg, NULL, x + (i - base) * ldx, L, mean[row_feature(i, C)],
                &parts[2 * i], &parts[2 * i + 1])


cdef void bn_sums_columns(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F, const floating* mean_col,
                          double* sg, double* sgx, const unsigned char* mask,
                          floating* dx=NULL, Py_ssize_t lddx=0,
                          const floating* k1=NULL, bint stream=False, Py_ssize_t base=0,
                          bint accumulate=False) noexcept nogil:
    """sg[f] = Σg, sgx[f] = Σg·(x - mean_col[f]) down the columns of rows r0..r1 (those the
    mask keeps; accumulate: added to sg and sgx).  With dx not NULL, also eval mode's dx of
    these rows in the same sweep: dx = k1[f]·g (0 on the rows the mask drops).  g, x and dx
    start at row base (the mask at row 0).  Calls over consecutive ranges of whole fours of
    rows, accumulating, give the bits of one call over them all.

    float32: mean_col is the mean rounded to float32 (bn_mean_correction adds back what that
    rounding moved), and four rows are combined in float32 before each float64 addition: the
    float64 sums then cost one conversion per four rows instead of two per element, and the
    error stays at float32 rounding of each four-row partial, not growing with the rows."""
    cdef Py_ssize_t i = r0, f
    cdef const floating* g0
    cdef const floating* g1
    cdef const floating* g2
    cdef const floating* g3
    cdef const floating* x0
    cdef const floating* x1
    cdef const floating* x2
    cdef const floating* x3
    cdef floating* d0 = NULL
    if not accumulate:
        for f in range(F):
            sg[f] = 0.0
            sgx[f] = 0.0
    if mask != NULL:
        for i in range(r0, r1):
            if mask[i]:
                g0 = g + (i - base) * ldg
                x0 = x + (i - base) * ldx
                for f in range(F):
                    sg[f] += g0[f]
                    sgx[f] += <double>(g0[f] * (x0[f] - mean_col[f]))
                if dx != NULL:
                    bn_dx_vector(g0, x0, dx + (i - base) * lddx, F, NULL, k1, NULL, NULL,
                                 False)
            elif dx != NULL:
                zero_row(dx + (i - base) * lddx, F)
        return
    # four rows per sweep of the feature axis, as in column_block_centered
    while i + 4 <= r1:
        g0 = g + (i - base) * ldg
        g1 = g0 + ldg
        g2 = g1 + ldg
        g3 = g2 + ldg
        x0 = x + (i - base) * ldx
        x1 = x0 + ldx
        x2 = x1 + ldx
        x3 = x2 + ldx
        if dx != NULL:
            d0 = dx + (i - base) * lddx
        if floating is float:
            cynorm_bn_colsums4_f(g0, g1, g2, g3, x0, x1, x2, x3, mean_col, sg, sgx, F, k1, d0,
                                 lddx, stream)
        elif d0 != NULL:
            cynorm_bn_colsums4_d(g0, g1, g2, g3, x0, x1, x2, x3, mean_col, sg, sgx, F, k1, d0,
                                 d0 + lddx, d0 + 2 * lddx, d0 + 3 * lddx)
        else:
            cynorm_bn_colsums4_d(g0, g1, g2, g3, x0, x1, x2, x3, mean_col, sg, sgx, F, NULL,
                                 NULL, NULL, NULL, NULL)
        i += 4
    while i < r1:
        g0 = g + (i - base) * ldg
        x0 = x + (i - base) * ldx
        for f in range(F):
            sg[f] += g0[f]
            sgx[f] += <double>(g0[f] * (x0[f] - mean_col[f]))
        if dx != NULL:
            bn_dx_vector(g0, x0, dx + (i - base) * lddx, F, NULL, k1, NULL, NULL, False)
        i += 1
    if stream:
        cynorm_sfence()


cdef void bn_dx_range(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                      floating* dx, Py_ssize_t lddx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t N,
                      Py_ssize_t C, bint by_rows, const floating* coef, bint training,
                      const unsigned char* mask, bint stream=False,
                      Py_ssize_t base=0) noexcept nogil:
    """dx of rows r0..r1.  coef (4, C) per feature (by rows) or (4, N) per column: mh, k1, k2,
    k3.  stream: streaming stores (training).  g, x and dx start at row base (the mask at row
    0)."""
    cdef Py_ssize_t i, c, k
    cdef Py_ssize_t K = C if by_rows else N
    for i in range(r0, r1):
        k = i - base
        if mask != NULL and not mask[i]:
            zero_row(dx + k * lddx, N)
        elif by_rows:
            c = row_feature(i, C)
            bn_dx_row(g + k * ldg, x + k * ldx, dx + k * lddx, N, coef[c], coef[K + c],
                      coef[2 * K + c], coef[3 * K + c], training, stream)
        else:
            bn_dx_vector(g + k * ldg, x + k * ldx, dx + k * lddx, N, coef, coef + K,
                         coef + 2 * K, coef + 3 * K, training, stream)
    if stream:
        cynorm_sfence()


cdef void bn_reduce_sums(bint by_rows, Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, int T,
                         const double* parts, double* sums, Py_ssize_t c0=0,
                         Py_ssize_t c1=-1) noexcept nogil:
    """Per-feature sums (2, C) from the per-row (by rows) or per-thread, per-column parts (by
    rows, features c0..c1 only if given)."""
    cdef Py_ssize_t t, i, a, c, j, L = N // C
    if by_rows:
        c1 = C if c1 < 0 else c1
        for c in range(c0, c1):
            sums[c] = 0.0
            sums[C + c] = 0.0
        for c in range(c0, c1):
            for a in range(M // C):
                i = a * C + c
                sums[c] += parts[2 * i]
                sums[C + c] += parts[2 * i + 1]
        return
    for c in range(2 * C):
        sums[c] = 0.0
    for t in range(T):
        for j in range(N):
            sums[column_feature(j, L)] += parts[2 * t * N + j]
            sums[C + column_feature(j, L)] += parts[2 * t * N + N + j]


cdef floating* column_means(Py_ssize_t N, Py_ssize_t C, const double* mean,
                            floating* out) noexcept nogil:
    """The mean of each column's feature, in the data's dtype (see bn_mean_correction)."""
    cdef Py_ssize_t j, L = N // C
    for j in range(N):
        out[j] = <floating>mean[column_feature(j, L)]
    return out


cdef void bn_mean_correction(Py_ssize_t C, const double* mean, double* sums,
                             floating dtype_tag) noexcept nogil:
    """Σg·(x - mean) from Σg·(x - m) with m = mean rounded to float32: + (m - mean)·Σg."""
    cdef Py_ssize_t c
    if floating is float:
        for c in range(C):
            sums[C + c] += (<double><float>mean[c] - mean[c]) * sums[c]


cdef inline void bn_total_sums(bint by_rows, Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, int T,
                               const double* mean, const double* parts, double* sums,
                               floating dtype_tag) noexcept nogil:
    """The per-feature sums (2, C) from the per-row or per-thread parts, with the columns'
    float32 mean correction (bn_mean_correction)."""
    bn_reduce_sums(by_rows, M, N, C, T, parts, sums)
    if not by_rows:
        bn_mean_correction(C, mean, sums, dtype_tag)


cdef void _batch_norm_sums(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                           Py_ssize_t M, Py_ssize_t N, Py_ssize_t C, bint by_rows,
                           const double* mean, double* parts, double* sums,
                           const unsigned char* mask, int T) noexcept nogil:
    """sums (2, C): Σg and Σg·(x - mean) per feature.  parts: 2·M doubles (by rows) or
    T·2·N + N (columns: per-thread sums, then the per-column mean)."""
    cdef Py_ssize_t t
    cdef floating* mean_col
    if by_rows:
        if T <= 1:
            bn_sums_rows(g, ldg, x, ldx, 0, M, N, C, mean, parts)
        else:
            for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                bn_sums_rows(g, ldg, x, ldx, chunk(M, t, T), chunk(M, t + 1, T), N, C, mean,
                             parts)
    else:
        mean_col = column_means(N, C, mean, <floating*>(parts + 2 * T * N))
        if T <= 1:
            bn_sums_columns(g, ldg, x, ldx, 0, M, N, mean_col, parts, parts + N, mask)
        else:
            for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                bn_sums_columns(g, ldg, x, ldx, chunk(M, t, T), chunk(M, t + 1, T), N,
                                mean_col, parts + 2 * t * N, parts + 2 * t * N + N, mask)
    bn_total_sums(by_rows, M, N, C, T, mean, parts, sums, <floating>0)


cdef void bn_coefficients(Py_ssize_t N, Py_ssize_t C, bint by_rows, const double* mean,
                          const double* invstd, const floating* w, const double* sums, double n,
                          bint training, floating* coef, Py_ssize_t j0=0,
                          Py_ssize_t j1=-1) noexcept nogil:
    """Per feature (by rows) or per column: mh, k1, k2, k3 with dx = k1·g + k2·(x - mh) + k3
    (features or columns j0..j1 only, all by default)."""
    cdef Py_ssize_t c, j, L = N // C, K = C if by_rows else N
    cdef double k1, k2, k3
    cdef floating mh, ml
    for j in range(j0, K if j1 < 0 else j1):
        c = j if by_rows else column_feature(j, L)
        k1 = (<double>w[c] if w != NULL else 1.0) * invstd[c]
        k2 = -k1 * invstd[c] * invstd[c] * sums[C + c] / n if training else 0.0
        k3 = -k1 * sums[c] / n if training else 0.0
        split_mean(mean[c], 0.0, &mh, &ml)
        coef[j] = mh
        coef[K + j] = <floating>k1
        coef[2 * K + j] = <floating>k2
        coef[3 * K + j] = <floating>(k3 - k2 * <double>ml)   # the mean's remainder, folded


cdef void _batch_norm_dx(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                         floating* dx, Py_ssize_t lddx, Py_ssize_t M, Py_ssize_t N,
                         Py_ssize_t C, bint by_rows, const floating* coef, bint training,
                         const unsigned char* mask, int T) noexcept nogil:
    cdef Py_ssize_t t
    cdef bint stream = bn_dx_streamed(M * N * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        bn_dx_range(g, ldg, x, ldx, dx, lddx, 0, M, N, C, by_rows, coef, training, mask,
                    stream)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        bn_dx_range(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T), N, C, by_rows,
                    coef, training, mask, stream)


cdef inline Py_ssize_t group_features(Py_ssize_t A, Py_ssize_t L, size_t itemsize) noexcept nogil:
    """Features per group: as many as GROUP_BYTES of g and x hold (A samples of L each)."""
    return GROUP_BYTES // (2 * A * L * <Py_ssize_t>itemsize)


cdef void grouped_rows(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                       floating* dx, Py_ssize_t lddx, Py_ssize_t a0, Py_ssize_t a1,
                       Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t L, Py_ssize_t C,
                       const double* mean, double* parts,
                       const floating* coef) noexcept nogil:
    """Features c0..c1 of samples a0..a1 (rows a·C + c0 .. a·C + c1, contiguous): their
    per-row sums into parts when coef is NULL, else their dx (streaming stores)."""
    cdef Py_ssize_t a
    for a in range(a0, a1):
        if coef == NULL:
            bn_sums_rows(g, ldg, x, ldx, a * C + c0, a * C + c1, L, C, mean, parts)
        else:
            bn_dx_range(g, ldg, x, ldx, dx, lddx, a * C + c0, a * C + c1, L, C, True, coef,
                        True, NULL, True)


cdef void grouped_pass(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                       floating* dx, Py_ssize_t lddx, Py_ssize_t A, Py_ssize_t c0,
                       Py_ssize_t c1, Py_ssize_t L, Py_ssize_t C, const double* mean,
                       double* parts, const floating* coef, int T) noexcept nogil:
    """grouped_rows over all A samples, split among T threads."""
    cdef Py_ssize_t t
    if T <= 1:
        grouped_rows(g, ldg, x, ldx, dx, lddx, 0, A, c0, c1, L, C, mean, parts, coef)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        grouped_rows(g, ldg, x, ldx, dx, lddx, chunk(A, t, T), chunk(A, t + 1, T), c0, c1, L,
                     C, mean, parts, coef)


cdef void _batch_norm_grouped(const floating* g, Py_ssize_t ldg, const floating* x,
                              Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t M,
                              Py_ssize_t L, Py_ssize_t C, const double* mean,
                              const double* invstd, const floating* w, double n, double* parts,
                              double* sums, floating* coef, int T) noexcept nogil:
    """Training backward by rows, a group of features at a time (see GROUP_BYTES)."""
    cdef Py_ssize_t A = M // C, G = group_features(A, L, sizeof(floating)), c0 = 0, c1
    while c0 < C:
        c1 = c0 + G if c0 + G < C else C
        grouped_pass(g, ldg, x, ldx, dx, lddx, A, c0, c1, L, C, mean, parts, NULL, T)
        bn_reduce_sums(True, M, L, C, T, parts, sums, c0, c1)
        bn_coefficients(L, C, True, mean, invstd, w, sums, n, True, coef, c0, c1)
        grouped_pass(g, ldg, x, ldx, dx, lddx, A, c0, c1, L, C, mean, parts, coef, T)
        c0 = c1


cdef void bn_eval_fused_range(const floating* g, Py_ssize_t ldg, const floating* x,
                              Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t r0,
                              Py_ssize_t r1, Py_ssize_t N, Py_ssize_t C, bint by_rows,
                              const double* mean, const floating* mean_col, const floating* coef,
                              double* parts, double* sg, double* sgx,
                              const unsigned char* mask, bint stream) noexcept nogil:
    """Eval backward of rows r0..r1 in one pass over g and x: the sums for the parameter
    gradients and dx = k1·g; by columns in the same sweep (float32: streaming stores with
    stream), by rows a few rows at a time while they are in cache."""
    cdef Py_ssize_t rb = r0, re
    if not by_rows:
        bn_sums_columns(g, ldg, x, ldx, r0, r1, N, mean_col, sg, sgx, mask, dx, lddx,
                        coef + N, stream)
        return
    while rb < r1:
        re = rb + FUSED_ROWS if rb + FUSED_ROWS < r1 else r1
        bn_sums_rows(g, ldg, x, ldx, rb, re, N, C, mean, parts)
        bn_dx_range(g, ldg, x, ldx, dx, lddx, rb, re, N, C, by_rows, coef, False, mask)
        rb = re


cdef void _batch_norm_eval_fused(const floating* g, Py_ssize_t ldg, const floating* x,
                                 Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t M,
                                 Py_ssize_t N, Py_ssize_t C, bint by_rows, const double* mean,
                                 const floating* coef, double* parts, double* sums,
                                 const unsigned char* mask, int T) noexcept nogil:
    cdef Py_ssize_t t
    cdef floating* mean_col = NULL
    cdef bint stream = bn_dx_streamed(M * N * <Py_ssize_t>sizeof(floating), T)
    if not by_rows:
        mean_col = column_means(N, C, mean, <floating*>(parts + 2 * T * N))
    if T <= 1:
        bn_eval_fused_range(g, ldg, x, ldx, dx, lddx, 0, M, N, C, by_rows, mean, mean_col, coef,
                            parts, parts, parts + N, mask, stream)
    else:
        for t in prange(T, num_threads=T, schedule="static", chunksize=1):
            bn_eval_fused_range(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T), N,
                                C, by_rows, mean, mean_col, coef, parts, parts + 2 * t * N,
                                parts + 2 * t * N + N, mask, stream)
    bn_total_sums(by_rows, M, N, C, T, mean, parts, sums, <floating>0)


cdef void bn_param_grads(Py_ssize_t C, const double* sums, const double* invstd, floating* gw,
                         floating* gb) noexcept nogil:
    """grad_weight = invstd·Σg·(x - mean), grad_bias = Σg (either may be NULL)."""
    cdef Py_ssize_t c
    for c in range(C):
        if gw != NULL:
            gw[c] = <floating>(sums[C + c] * invstd[c])
        if gb != NULL:
            gb[c] = <floating>sums[c]


cdef void _batch_norm_backward_run(const floating* g, Py_ssize_t ldg, const floating* x,
                                   Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t rows,
                                   Py_ssize_t cols, Py_ssize_t C, bint by_rows, bint training,
                                   bint grouped, const double* mp, const double* ip,
                                   const floating* w, double n, double* parts, double* sp,
                                   floating* coef, const unsigned char* mk,
                                   int T) noexcept nogil:
    """The three ways of batch_norm_backward, for either dtype: eval with parameter gradients
    (their sums and dx in one pass), training by feature groups (large (N, C, L) input), or
    the sums (when any are wanted), then the coefficients, then dx."""
    if not training and sp != NULL:
        bn_coefficients(cols, C, by_rows, mp, ip, w, sp, n, False, coef)
        _batch_norm_eval_fused(g, ldg, x, ldx, dx, lddx, rows, cols, C, by_rows, mp, coef, parts,
                               sp, mk, T)
    elif grouped:
        _batch_norm_grouped(g, ldg, x, ldx, dx, lddx, rows, cols, C, mp, ip, w, n, parts, sp,
                            coef, T)
    else:
        if sp != NULL:
            _batch_norm_sums(g, ldg, x, ldx, rows, cols, C, by_rows, mp, parts, sp, mk, T)
        bn_coefficients(cols, C, by_rows, mp, ip, w, sp, n, training, coef)
        _batch_norm_dx(g, ldg, x, ldx, dx, lddx, rows, cols, C, by_rows, coef, training, mk, T)


cdef double bn_count(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t C, bint by_rows,
                     const unsigned char* mk) noexcept nogil:
    """Elements per feature: those of the rows the mask keeps (column layout)."""
    cdef Py_ssize_t r
    cdef double n
    if mk == NULL:
        return <double>((rows // C) * cols if by_rows else rows * (cols // C))
    n = 0.0
    for r in range(rows):
        n += mk[r] != 0
    return n * (cols // C)


def batch_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t rows,
                        Py_ssize_t cols, Py_ssize_t C, bint by_rows, cnp.ndarray mean,
                        cnp.ndarray invstd, cnp.ndarray weight, bint training,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                        cnp.ndarray mask=None, int half=-1):
    """dx of BatchNorm from grad_out g and input x seen as (rows, cols), features laid out as
    in feature_moments; mean and invstd: float64 (C,); weight: C elements of x's dtype or None.

    grad_weight, grad_bias: C elements of x's dtype that receive invstd·Σg·(x - mean) and Σg
    per feature (sums in float64), or None.  mask (one bool per row, column layout only):
    padding rows get dx = 0 and are left out of the sums and of the count.  Returns nothing;
    dx is written in place.  half (HALF_F16, HALF_BF16; -1: none): g, x and dx are 16-bit of
    that kind, weight float32 or of that kind, grad_weight and grad_bias float32
    (ops/batch_norm_backward_half.pxi).
    """
    if half >= 0:
        run_half_batch_norm_backward(g, x, dx, rows, cols, C, by_rows, mean, invstd, weight,
                                     training, grad_weight, grad_bias, n_threads, mask, half)
        return
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef Py_ssize_t off
    cdef Py_ssize_t ldx = row_stride(x, rows, cols, False), ldg = row_stride(g, rows, cols, False)
    cdef Py_ssize_t lddx = row_stride(dx, rows, cols, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, C, f32)
    cdef double* mp = float64_data(mean, C, False)
    cdef double* ip = float64_data(invstd, C, False)
    cdef void* gw = optional_data(grad_weight, C, f32)
    cdef void* gb = optional_data(grad_bias, C, f32)
    cdef bint want_sums = training or gw != NULL or gb != NULL
    cdef bint grouped
    cdef int T = max(1, n_threads)
    cdef double n
    cdef double* parts = NULL
    cdef double* sp = NULL
    cdef void* coef = NULL
    if is_float32(g) != f32 or is_float32(dx) != f32 or mp == NULL or ip == NULL:
        raise TypeError("batch_norm_backward: inconsistent arrays")
    if not layout_fits(rows, cols, C, by_rows):
        raise ValueError("batch_norm_backward: inconsistent shape")
    if by_rows and mk != NULL:
        raise ValueError("batch_norm_backward: a row mask needs the column layout")
    n = bn_count(rows, cols, C, by_rows, mk)
    # parts: the per-row or per-thread partial sums, then the sums (2, C)
    off = 2 * rows if by_rows else 2 * T * cols + cols
    parts = <double*>malloc(sizeof(double) * (off + 2 * C))
    coef = malloc(4 * (C if by_rows else cols) * cnp.PyArray_ITEMSIZE(x))
    if parts == NULL or coef == NULL:
        free(parts)
        free(coef)
        raise MemoryError()
    if want_sums:
        sp = parts + off
    grouped = (training and by_rows
               and 2 * rows * cols * cnp.PyArray_ITEMSIZE(x) >= GROUP_MIN_BYTES
               and group_features(rows // C, cols, cnp.PyArray_ITEMSIZE(x)) >= GROUP_MIN_FEATURES)
    try:
        with nogil:
            if rows * cols == 0:
                memset(parts + off, 0, 2 * C * sizeof(double))
            elif f32:
                _batch_norm_backward_run(<const float*>cnp.PyArray_DATA(g), ldg,
                                         <const float*>cnp.PyArray_DATA(x), ldx,
                                         <float*>cnp.PyArray_DATA(dx), lddx, rows, cols, C,
                                         by_rows, training, grouped, mp, ip, <const float*>w, n,
                                         parts, sp, <float*>coef, mk, T)
            else:
                _batch_norm_backward_run(<const double*>cnp.PyArray_DATA(g), ldg,
                                         <const double*>cnp.PyArray_DATA(x), ldx,
                                         <double*>cnp.PyArray_DATA(dx), lddx, rows, cols, C,
                                         by_rows, training, grouped, mp, ip, <const double*>w, n,
                                         parts, sp, <double*>coef, mk, T)
            if f32:
                bn_param_grads(C, parts + off, ip, <float*>gw, <float*>gb)
            else:
                bn_param_grads(C, parts + off, ip, <double*>gw, <double*>gb)
    finally:
        free(parts)
        free(coef)
