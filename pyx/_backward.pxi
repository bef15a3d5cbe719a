# Backward kernels of LayerNorm and BatchNorm, included by every kernels module after
# _kernels_impl.pxi (whose helpers they use: chunk, row_stride, is_float32, optional_data, ...).
#
# Gradients are accumulated in float64 and written in the input dtype.  The statistics saved by
# the forward pass (mean, rstd / invstd) arrive as float64 and are never recomputed here.
#
# LayerNorm, per row of n elements with x̂ = (x - mean)·rstd and g' = g·w:
#     dx = rstd·(g' - mean(g') - x̂·mean(g'·x̂))
#     dw += g·x̂, db += g            (per-thread partial sums, added up at the end)
# BatchNorm, per feature over its n elements:
#     training: dx = w·invstd·(g - Σg/n - (x - mean)·invstd²·Σg(x - mean)/n)
#     eval:     dx = w·invstd·g      (the running statistics are constants)
#     dw = invstd·Σg(x - mean), db = Σg


cdef inline void gx_sums(const floating* g, const floating* w, const floating* x, Py_ssize_t n,
                         double shift, double* sg, double* sgx) noexcept nogil:
    """sg = Σ g·w, sgx = Σ g·w·(x - shift); w may be NULL."""
    if floating is float:
        cynorm_gx_sums_f(g, w, x, n, shift, sg, sgx)
    else:
        cynorm_gx_sums_d(g, w, x, n, shift, sg, sgx)


cdef void layer_norm_param_grads(const floating* g, Py_ssize_t ldg, const floating* x,
                                 Py_ssize_t ldx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D,
                                 const double* mean, const double* rstd, double* dw, double* db,
                                 const unsigned char* mask) noexcept nogil:
    """dw += Σ g·x̂ and db += Σ g over the rows r0..r1 the mask keeps (dw or db may be NULL),
    four rows per sweep.  float32 rows come here only one at a time (masked rows) or as the
    up to three rows the four-row sweep of layer_norm_backward_rows leaves over."""
    cdef Py_ssize_t i = r0, j, k, idx[4]
    cdef const floating* gr[4]
    cdef const floating* xr[4]
    cdef floating mh[4]
    cdef floating ml[4]
    cdef floating rs[4]
    if mask != NULL:
        # rows the mask keeps, one at a time (padding is skipped where it lies)
        for i in range(r0, r1):
            if mask[i]:
                layer_norm_param_grads(g, ldg, x, ldx, i, i + 1, D, mean, rstd, dw, db, NULL)
        return
    while i < r1:
        if i + 4 <= r1:
            for k in range(4):
                gr[k] = g + (i + k) * ldg
                xr[k] = x + (i + k) * ldx
                split_mean(mean[i + k], 0.0, &mh[k], &ml[k])
                rs[k] = <floating>rstd[i + k]
            if dw != NULL:
                for j in range(D):
                    dw[j] += ((gr[0][j] * (((xr[0][j] - mh[0]) - ml[0]) * rs[0])
                               + gr[1][j] * (((xr[1][j] - mh[1]) - ml[1]) * rs[1]))
                              + (gr[2][j] * (((xr[2][j] - mh[2]) - ml[2]) * rs[2])
                                 + gr[3][j] * (((xr[3][j] - mh[3]) - ml[3]) * rs[3])))
            if db != NULL:
                for j in range(D):
                    db[j] += (<double>gr[0][j] + <double>gr[1][j]) + (<double>gr[2][j]
                                                                      + <double>gr[3][j])
            i += 4
        else:
            gr[0] = g + i * ldg
            xr[0] = x + i * ldx
            split_mean(mean[i], 0.0, &mh[0], &ml[0])
            rs[0] = <floating>rstd[i]
            if dw != NULL:
                for j in range(D):
                    dw[j] += gr[0][j] * (((xr[0][j] - mh[0]) - ml[0]) * rs[0])
            if db != NULL:
                for j in range(D):
                    db[j] += gr[0][j]
            i += 1


cdef void layer_norm_backward_rows(const floating* g, Py_ssize_t ldg, const floating* x,
                                   Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t r0,
                                   Py_ssize_t r1, Py_ssize_t D, const floating* w,
                                   const double* mean, const double* rstd, double* dw,
                                   double* db, const unsigned char* mask,
                                   bint stream) noexcept nogil:
    """Rows r0..r1: per row the two sums of _simd.h, then one pass writing dx, and the
    parameter gradients (dw, db may be NULL) every four rows while they are in cache; float32
    without a mask: four rows' sums, then one sweep writing their dx (streaming stores with
    stream) and parameter gradients.
    x - mean is (x - m_hi) - m_lo in the input dtype.  Rows the mask marks as padding get
    dx = 0 and add nothing to dw and db."""
    cdef Py_ssize_t i, j, k, i0, i1
    cdef const floating* gi
    cdef const floating* xi
    cdef floating* dxi
    cdef double m, rs, sg = 0.0, sgx = 0.0
    cdef floating mh, ml, rsf, af, cf
    cdef const float* g4[4]
    cdef const float* x4[4]
    cdef float* dx4[4]
    cdef float mh4[4]
    cdef float ml4[4]
    cdef float rs4[4]
    cdef float af4[4]
    cdef float cf4[4]
    if floating is float and mask == NULL:
        while r0 + 4 <= r1:
            for k in range(4):
                g4[k] = g + (r0 + k) * ldg
                x4[k] = x + (r0 + k) * ldx
                dx4[k] = dx + (r0 + k) * lddx
                rs = rstd[r0 + k]
                split_mean(mean[r0 + k], 0.0, &mh4[k], &ml4[k])
                rs4[k] = <float>rs
                # (asking for the same row of the next four meanwhile)
                cynorm_ln_gx_sums_f(g4[k], w, x4[k], D, mh4[k], ml4[k], &sg, &sgx, 4 * ldg,
                                    4 * ldx)
                af4[k] = <float>(sg / D)
                cf4[k] = <float>(rs * rs * rs * sgx / D)
            cynorm_ln_paramgrads4_f(g4, x4, mh4, ml4, rs4, dw, db, D, w, af4, cf4, dx4, stream)
            r0 += 4
        if stream:
            cynorm_sfence()
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            zero_row(dx + i * lddx, D)
        else:
            gi = g + i * ldg
            xi = x + i * ldx
            dxi = dx + i * lddx
            m = mean[i]
            rs = rstd[i]
            split_mean(m, 0.0, &mh, &ml)
            rsf = <floating>rs
            if floating is float:
                cynorm_ln_gx_sums_f(gi, w, xi, D, mh, ml, &sg, &sgx, 0, 0)
            else:
                gx_sums(gi, w, xi, D, m, &sg, &sgx)
            af = <floating>(sg / D)
            cf = <floating>(rs * rs * rs * sgx / D)
            if floating is float:   # the arithmetic of the four-row sweeps, to the bit
                cynorm_ln_dx_row_f(gi, w, xi, dxi, D, mh, ml, rsf, af, cf)
            elif w != NULL:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] * w[j] - af) - cf * ((xi[j] - mh) - ml)
            else:
                for j in range(D):
                    dxi[j] = rsf * (gi[j] - af) - cf * ((xi[j] - mh) - ml)
        if (dw != NULL or db != NULL) and ((i - r0) % 4 == 3 or i == r1 - 1):
            # the parameter gradients of the last four rows, while they are in cache
            i0 = i - (i - r0) % 4
            layer_norm_param_grads(g, ldg, x, ldx, i0, i + 1, D, mean, rstd, dw, db, mask)


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
    the cache) they measured no faster than normal stores, on 1 and 2 threads: 0.95-1.13 of
    the time for eval, 0.99-1.06 for training (benchmarks/RESULTS.md, item 37)."""
    return T <= 1 and STREAM_BYTES_ONE_THREAD <= nbytes < STREAM_BYTES


cdef void bn_sums_rows(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t L, Py_ssize_t C,
                       const double* mean, double* parts) noexcept nogil:
    """Σg and Σg·(x - mean) of rows r0..r1 (row i: feature i % C) into parts[2i], parts[2i+1]."""
    cdef Py_ssize_t i
    for i in range(r0, r1):
        gx_sums(g + i * ldg, NULL, x + i * ldx, L, mean[i % C], &parts[2 * i],
                &parts[2 * i + 1])


cdef void bn_sums_columns(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                          Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F, const floating* mean_col,
                          double* sg, double* sgx, const unsigned char* mask,
                          floating* dx=NULL, Py_ssize_t lddx=0,
                          const floating* k1=NULL, bint stream=False) noexcept nogil:
    """sg[f] = Σg, sgx[f] = Σg·(x - mean_col[f]) down the columns of rows r0..r1 (those the
    mask keeps).  With dx not NULL, also eval mode's dx of these rows in the same sweep:
    dx = k1[f]·g (0 on the rows the mask drops).

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
    for f in range(F):
        sg[f] = 0.0
        sgx[f] = 0.0
    if mask != NULL:
        for i in range(r0, r1):
            if mask[i]:
                g0 = g + i * ldg
                x0 = x + i * ldx
                for f in range(F):
                    sg[f] += g0[f]
                    sgx[f] += <double>(g0[f] * (x0[f] - mean_col[f]))
                if dx != NULL:
                    bn_dx_vector(g0, x0, dx + i * lddx, F, NULL, k1, NULL, NULL, False)
            elif dx != NULL:
                zero_row(dx + i * lddx, F)
        return
    # four rows per sweep of the feature axis, as in column_block_centered
    while i + 4 <= r1:
        g0 = g + i * ldg
        g1 = g0 + ldg
        g2 = g1 + ldg
        g3 = g2 + ldg
        x0 = x + i * ldx
        x1 = x0 + ldx
        x2 = x1 + ldx
        x3 = x2 + ldx
        if dx != NULL:
            d0 = dx + i * lddx
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
        g0 = g + i * ldg
        x0 = x + i * ldx
        for f in range(F):
            sg[f] += g0[f]
            sgx[f] += <double>(g0[f] * (x0[f] - mean_col[f]))
        if dx != NULL:
            bn_dx_vector(g0, x0, dx + i * lddx, F, NULL, k1, NULL, NULL, False)
        i += 1
    if stream:
        cynorm_sfence()


cdef void bn_dx_range(const floating* g, Py_ssize_t ldg, const floating* x, Py_ssize_t ldx,
                      floating* dx, Py_ssize_t lddx, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t N,
                      Py_ssize_t C, bint by_rows, const floating* coef, bint training,
                      const unsigned char* mask, bint stream=False) noexcept nogil:
    """dx of rows r0..r1.  coef (4, C) per feature (by rows) or (4, N) per column: mh, k1, k2,
    k3.  stream: streaming stores (training)."""
    cdef Py_ssize_t i, c
    cdef Py_ssize_t K = C if by_rows else N
    for i in range(r0, r1):
        if mask != NULL and not mask[i]:
            zero_row(dx + i * lddx, N)
        elif by_rows:
            c = i % C
            bn_dx_row(g + i * ldg, x + i * ldx, dx + i * lddx, N, coef[c], coef[K + c],
                      coef[2 * K + c], coef[3 * K + c], training, stream)
        else:
            bn_dx_vector(g + i * ldg, x + i * ldx, dx + i * lddx, N, coef, coef + K,
                         coef + 2 * K, coef + 3 * K, training, stream)
    if stream:
        cynorm_sfence()


cdef void _layer_norm_backward(const floating* g, Py_ssize_t ldg, const floating* x,
                               Py_ssize_t ldx, floating* dx, Py_ssize_t lddx, Py_ssize_t M,
                               Py_ssize_t D, const floating* w, const double* mean,
                               const double* rstd, double* dw, double* db,
                               const unsigned char* mask, int T) noexcept nogil:
    # dw, db: T rows of D (or NULL), one per thread
    cdef Py_ssize_t t
    cdef bint stream = streamed(M * D * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, 0, M, D, w, mean, rstd, dw, db,
                                 mask, stream)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        layer_norm_backward_rows(g, ldg, x, ldx, dx, lddx, chunk(M, t, T), chunk(M, t + 1, T),
                                 D, w, mean, rstd, dw + t * D if dw != NULL else NULL,
                                 db + t * D if db != NULL else NULL, mask, stream)


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
            sums[j // L] += parts[2 * t * N + j]
            sums[C + j // L] += parts[2 * t * N + N + j]


cdef floating* column_means(Py_ssize_t N, Py_ssize_t C, const double* mean,
                            floating* out) noexcept nogil:
    """The mean of each column's feature, in the data's dtype (see bn_mean_correction)."""
    cdef Py_ssize_t j, L = N // C
    for j in range(N):
        out[j] = <floating>mean[j // L]
    return out


cdef void bn_mean_correction(Py_ssize_t C, const double* mean, double* sums,
                             floating dtype_tag) noexcept nogil:
    """Σg·(x - mean) from Σg·(x - m) with m = mean rounded to float32: + (m - mean)·Σg."""
    cdef Py_ssize_t c
    if floating is float:
        for c in range(C):
            sums[C + c] += (<double><float>mean[c] - mean[c]) * sums[c]


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
    bn_reduce_sums(by_rows, M, N, C, T, parts, sums)
    if not by_rows:
        bn_mean_correction(C, mean, sums, <floating>0)


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
        c = j if by_rows else j // L
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


# Training by rows ((N, C, L) with long L) when g and x together outgrow GROUP_MIN_BYTES:
# features are taken a group at a time, their sums then their dx (streamed: nothing here reads
# it again), while the group's rows of g and x (GROUP_BYTES of them) are still in the cache, so
# g and x come from memory once instead of twice.  Only when a group holds GROUP_MIN_FEATURES
# features or more: short groups (many samples per feature, as (256, 64, 784)) measured slower
# than the two plain passes (benchmarks/RESULTS.md, item 49).
cdef Py_ssize_t GROUP_MIN_BYTES = 24 << 20
cdef Py_ssize_t GROUP_BYTES = 4 << 20
cdef Py_ssize_t GROUP_MIN_FEATURES = 4


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


cdef enum:
    FUSED_ROWS = 16   # rows per step of the eval pass by rows: their sums, then their dx


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
    bn_reduce_sums(by_rows, M, N, C, T, parts, sums)
    if not by_rows:
        bn_mean_correction(C, mean, sums, <floating>0)


cdef void bn_param_grads(Py_ssize_t C, const double* sums, const double* invstd, floating* gw,
                         floating* gb) noexcept nogil:
    """grad_weight = invstd·Σg·(x - mean), grad_bias = Σg (either may be NULL)."""
    cdef Py_ssize_t c
    for c in range(C):
        if gw != NULL:
            gw[c] = <floating>(sums[C + c] * invstd[c])
        if gb != NULL:
            gb[c] = <floating>sums[c]


cdef void sum_parts(const double* parts, int T, Py_ssize_t D, floating* out) noexcept nogil:
    """out[j] = Σ_t parts[t·D + j] (the threads' partial sums in order); nothing when out or
    parts is NULL."""
    cdef Py_ssize_t j
    cdef int t
    cdef double s
    if parts == NULL or out == NULL:
        return
    for j in range(D):
        s = parts[j]
        for t in range(1, T):
            s += parts[t * D + j]
        out[j] = <floating>s


def layer_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t D,
                        cnp.ndarray weight, cnp.ndarray mean, cnp.ndarray rstd,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                        cnp.ndarray mask=None):
    """dx from grad_out g and input x (same dtype, rows of D elements) and the saved float64
    mean and rstd (one per row); weight: D elements of x's dtype or None.

    grad_weight, grad_bias: D elements of x's dtype that receive Σ g·x̂ and Σ g over the rows,
    or None: summed in float64, per thread, then the threads' sums in order.
    """
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldg = row_stride(g, M, D, False)
    cdef Py_ssize_t lddx = row_stride(dx, M, D, True)
    cdef int f32 = is_float32(x)
    cdef void* w = optional_data(weight, D, f32)
    cdef double* mp = float64_data(mean, M, False)
    cdef double* rp = float64_data(rstd, M, False)
    cdef void* gw = optional_data(grad_weight, D, f32)
    cdef void* gb = optional_data(grad_bias, D, f32)
    cdef int T = max(1, n_threads)
    cdef double* parts = NULL
    cdef double* dw = NULL
    cdef double* db = NULL
    cdef const unsigned char* mk = mask_data(mask, M)
    if is_float32(g) != f32 or is_float32(dx) != f32 or mp == NULL or rp == NULL:
        raise TypeError("layer_norm_backward: inconsistent arrays")
    if gw != NULL or gb != NULL:
        # per-thread partial sums (zeroed), T rows of D for each gradient
        parts = <double*>calloc(2 * T * D + 1, sizeof(double))
        if parts == NULL:
            raise MemoryError()
        dw = parts if gw != NULL else NULL
        db = parts + T * D if gb != NULL else NULL
    try:
        with nogil:
            if f32:
                if M > 0:
                    _layer_norm_backward(<const float*>cnp.PyArray_DATA(g), ldg,
                                         <const float*>cnp.PyArray_DATA(x), ldx,
                                         <float*>cnp.PyArray_DATA(dx), lddx, M, D,
                                         <const float*>w, mp, rp, dw, db, mk, T)
                sum_parts(dw, T, D, <float*>gw)
                sum_parts(db, T, D, <float*>gb)
            else:
                if M > 0:
                    _layer_norm_backward(<const double*>cnp.PyArray_DATA(g), ldg,
                                         <const double*>cnp.PyArray_DATA(x), ldx,
                                         <double*>cnp.PyArray_DATA(dx), lddx, M, D,
                                         <const double*>w, mp, rp, dw, db, mk, T)
                sum_parts(dw, T, D, <double*>gw)
                sum_parts(db, T, D, <double*>gb)
    finally:
        free(parts)


def batch_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t rows,
                        Py_ssize_t cols, Py_ssize_t C, bint by_rows, cnp.ndarray mean,
                        cnp.ndarray invstd, cnp.ndarray weight, bint training,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, int n_threads,
                        cnp.ndarray mask=None):
    """dx of BatchNorm from grad_out g and input x seen as (rows, cols), features laid out as
    in feature_moments; mean and invstd: float64 (C,); weight: C elements of x's dtype or None.

    grad_weight, grad_bias: C elements of x's dtype that receive invstd·Σg·(x - mean) and Σg
    per feature (sums in float64), or None.  mask (one bool per row, column layout only):
    padding rows get dx = 0 and are left out of the sums and of the count.  Returns nothing;
    dx is written in place.
    """
    cdef const unsigned char* mk = mask_data(mask, rows)
    cdef Py_ssize_t r, off
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
    if C <= 0 or (by_rows and rows % C) or (not by_rows and cols % C):
        raise ValueError("batch_norm_backward: inconsistent shape")
    if by_rows and mk != NULL:
        raise ValueError("batch_norm_backward: a row mask needs the column layout")
    n = <double>((rows // C) * cols if by_rows else rows * (cols // C))
    if mk != NULL:
        n = 0.0
        for r in range(rows):
            n += mk[r] != 0
        n *= cols // C
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
                if not training and sp != NULL:
                    bn_coefficients(cols, C, by_rows, mp, ip, <const float*>w, sp, n, False,
                                    <float*>coef)
                    _batch_norm_eval_fused(<const float*>cnp.PyArray_DATA(g), ldg,
                                           <const float*>cnp.PyArray_DATA(x), ldx,
                                           <float*>cnp.PyArray_DATA(dx), lddx, rows, cols, C,
                                           by_rows, mp, <float*>coef, parts, sp, mk, T)
                elif grouped:
                    _batch_norm_grouped(<const float*>cnp.PyArray_DATA(g), ldg,
                                        <const float*>cnp.PyArray_DATA(x), ldx,
                                        <float*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, mp, ip,
                                        <const float*>w, n, parts, sp, <float*>coef, T)
                else:
                    if sp != NULL:
                        _batch_norm_sums(<const float*>cnp.PyArray_DATA(g), ldg,
                                         <const float*>cnp.PyArray_DATA(x), ldx, rows, cols, C,
                                         by_rows, mp, parts, sp, mk, T)
                    bn_coefficients(cols, C, by_rows, mp, ip, <const float*>w, sp, n, training,
                                    <float*>coef)
                    _batch_norm_dx(<const float*>cnp.PyArray_DATA(g), ldg,
                                   <const float*>cnp.PyArray_DATA(x), ldx,
                                   <float*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, by_rows,
                                   <float*>coef, training, mk, T)
            else:
                if not training and sp != NULL:
                    bn_coefficients(cols, C, by_rows, mp, ip, <const double*>w, sp, n, False,
                                    <double*>coef)
                    _batch_norm_eval_fused(<const double*>cnp.PyArray_DATA(g), ldg,
                                           <const double*>cnp.PyArray_DATA(x), ldx,
                                           <double*>cnp.PyArray_DATA(dx), lddx, rows, cols, C,
                                           by_rows, mp, <double*>coef, parts, sp, mk, T)
                elif grouped:
                    _batch_norm_grouped(<const double*>cnp.PyArray_DATA(g), ldg,
                                        <const double*>cnp.PyArray_DATA(x), ldx,
                                        <double*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, mp, ip,
                                        <const double*>w, n, parts, sp, <double*>coef, T)
                else:
                    if sp != NULL:
                        _batch_norm_sums(<const double*>cnp.PyArray_DATA(g), ldg,
                                         <const double*>cnp.PyArray_DATA(x), ldx, rows, cols, C,
                                         by_rows, mp, parts, sp, mk, T)
                    bn_coefficients(cols, C, by_rows, mp, ip, <const double*>w, sp, n,
                                    training, <double*>coef)
                    _batch_norm_dx(<const double*>cnp.PyArray_DATA(g), ldg,
                                   <const double*>cnp.PyArray_DATA(x), ldx,
                                   <double*>cnp.PyArray_DATA(dx), lddx, rows, cols, C, by_rows,
                                   <double*>coef, training, mk, T)
            if f32:
                bn_param_grads(C, parts + off, ip, <float*>gw, <float*>gb)
            else:
                bn_param_grads(C, parts + off, ip, <double*>gw, <double*>gb)
    finally:
        free(parts)
        free(coef)
