# GroupNorm and InstanceNorm (InstanceNorm is GroupNorm with one channel per group), forward and
# backward.  x is (N, C, S) channels-first or (N, S, C) channels-last, C-contiguous; the
# statistics are per (sample, group), over the group's C / G channels and the sample's real
# positions (mask (N, S), one byte per position; NULL: every position is real).
#
# The work is split into units that own their outputs, so the result does not depend on the
# thread count:
#   channels-first: one (sample, group): the moments of its channels' rows (core/moments.pxi,
#     Chan's merge over the mask's runs), then those rows normalized while they are in cache;
#   channels-last: one sample: its (S, C) column moments (core/columns.pxi), merged per group,
#     then its rows normalized with per-channel vectors.
# The normalization is BatchNorm's per-feature one (ops/batch_norm.pxi: feature_params and
# its rows) with the parameters of each (sample, channel).  Backward has the same units: per
# channel Σg and Σg·(x - mean), then dx = k1·g + k2·(x - m_hi) + k3 on BatchNorm's dx rows
# (ops/batch_norm_backward.pxi); Python forms dw and db from the per-(sample, channel) sums.
# 16-bit input (forward) has the same units: ops/group_norm_half.pxi.

cdef extern from "ops/group_norm.h" nogil:
    void cynorm_gn_apply_f(const float* x, float* y, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t F,
                           const float* mh, const float* sc, const float* sh,
                           const unsigned char* mask, int nt) noexcept
    void cynorm_gn_apply_d(const double* x, double* y, Py_ssize_t r0, Py_ssize_t r1,
                           Py_ssize_t F, const double* mh, const double* sc, const double* sh,
                           const unsigned char* mask, int nt) noexcept


cdef inline Py_ssize_t run_from(const unsigned char* m, Py_ssize_t j, Py_ssize_t S,
                                bint real) noexcept nogil:
    """The first position from j on whose mask value is not ``real`` (S if none)."""
    while j < S and (m[j] != 0) == real:
        j += 1
    return j


cdef void masked_moments(const floating* x, Py_ssize_t S, const unsigned char* m, double* n,
                         double* hi, double* lo, double* m2) noexcept nogil:
    """Merge the moments of x's real positions (runs of the mask) into (n, hi + lo, m2)."""
    cdef Py_ssize_t a = 0, b
    cdef double bhi = 0.0, blo = 0.0, bm2 = 0.0
    while True:
        a = run_from(m, a, S, False)
        if a >= S:
            return
        b = run_from(m, a, S, True)
        row_moments(x + a, b - a, &bhi, &blo, &bm2)
        merge_one(n, hi, lo, m2, <double>(b - a), bhi, blo, bm2)
        a = b


cdef void masked_gx_sums(const floating* g, const floating* x, Py_ssize_t S,
                         const unsigned char* m, double mean, double* sg,
                         double* sgx) noexcept nogil:
    """Σg and Σg·(x - mean) over x's real positions (sg, sgx overwritten)."""
    cdef Py_ssize_t a = 0, b
    cdef double s1, s2
    sg[0] = 0.0
    sgx[0] = 0.0
    while True:
        a = run_from(m, a, S, False)
        if a >= S:
            return
        b = run_from(m, a, S, True)
        s1 = 0.0
        s2 = 0.0
        gx_sums(g + a, NULL, x + a, b - a, mean, &s1, &s2)
        sg[0] += s1
        sgx[0] += s2
        a = b


cdef void group_row(const floating* x, floating* y, Py_ssize_t S, const unsigned char* m,
                    floating mh, floating scale, floating shift, bint write_padding,
                    bint stream) noexcept nogil:
    """One channel's row: y = (x - mh)·scale + shift at the real positions, 0 at padding."""
    cdef Py_ssize_t a = 0, b
    if m == NULL:
        normalize_row_scalar(x, y, S, mh, scale, shift, stream)
        return
    while a < S:
        b = run_from(m, a, S, False)
        if b > a and write_padding:
            zero_row(y + a, b - a, stream)
        a = run_from(m, b, S, True)
        if a > b:
            normalize_row_scalar(x + b, y + b, a - b, mh, scale, shift, stream)


cdef void group_dx_row(const floating* g, const floating* x, floating* dx, Py_ssize_t S,
                       const unsigned char* m, floating mh, floating k1, floating k2,
                       floating k3, bint training, bint stream) noexcept nogil:
    """One channel's dx at the real positions, 0 at padding."""
    cdef Py_ssize_t a = 0, b
    if m == NULL:
        bn_dx_row(g, x, dx, S, mh, k1, k2, k3, training, stream)
        return
    while a < S:
        b = run_from(m, a, S, False)
        if b > a:
            zero_row(dx + a, b - a, stream)
        a = run_from(m, b, S, True)
        if a > b:
            bn_dx_row(g + b, x + b, dx + b, a - b, mh, k1, k2, k3, training, stream)


cdef inline Py_ssize_t rows_per_block(Py_ssize_t F, size_t itemsize) noexcept nogil:
    """Rows per block of the float64 column sweep, as BatchNorm's moments take them."""
    cdef Py_ssize_t r = COLUMN_BLOCK_BYTES // (F * <Py_ssize_t>itemsize)
    return 8 if r < 8 else (MAX_BLOCK_ROWS if r > MAX_BLOCK_ROWS else r)


cdef inline void group_params(double* st, Py_ssize_t u, Py_ssize_t NG, double eps,
                              const floating* w, const floating* b, Py_ssize_t c0,
                              Py_ssize_t c1, Py_ssize_t C, floating* params) noexcept nogil:
    """params (3, C) of channels c0..c1 from the moments of unit u (st: count, hi, lo, M2),
    and its mean and rstd into st's rows 4 and 5 (NaN for a unit with no real position)."""
    cdef Py_ssize_t c
    cdef double count = st[u], var = st[3 * NG + u] / count, inv = 1.0 / sqrt(var + eps)
    for c in range(c0, c1):
        feature_params(st[NG + u], st[2 * NG + u], var, inv, w, b, c, C, params)
    st[4 * NG + u] = st[NG + u] + st[2 * NG + u] if count > 0 else NAN
    st[5 * NG + u] = inv if count > 0 else NAN


cdef void group_first_unit(const floating* x, floating* y, Py_ssize_t u, Py_ssize_t C,
                           Py_ssize_t S, Py_ssize_t G, Py_ssize_t NG, const floating* w,
                           const floating* b, double eps, double* st, bint given,
                           const unsigned char* mask, bint write_padding, floating* params,
                           bint stream) noexcept nogil:
    """Channels-first unit u = n·G + g: its moments into st (unless given), then its rows."""
    cdef Py_ssize_t n = u // G, Cg = C // G, c0 = (u % G) * Cg, c
    cdef const floating* xg = x + (n * C + c0) * S
    cdef const unsigned char* m = mask + n * S if mask != NULL else NULL
    cdef double cnt = 0.0, hi = 0.0, lo = 0.0, m2 = 0.0
    if not given:
        if m == NULL:
            row_moments(xg, Cg * S, &hi, &lo, &m2)
            cnt = <double>(Cg * S)
        else:
            for c in range(Cg):
                masked_moments(xg + c * S, S, m, &cnt, &hi, &lo, &m2)
        st[u] = cnt
        st[NG + u] = hi
        st[2 * NG + u] = lo
        st[3 * NG + u] = m2
    group_params(st, u, NG, eps, w, b, c0, c0 + Cg, C, params)
    for c in range(c0, c0 + Cg):
        group_row(x + (n * C + c) * S, y + (n * C + c) * S, S, m, params[c], params[C + c],
                  params[2 * C + c], write_padding, stream)


cdef void group_last_unit(const floating* x, floating* y, Py_ssize_t n, Py_ssize_t C,
                          Py_ssize_t S, Py_ssize_t G, Py_ssize_t NG, const floating* w,
                          const floating* b, double eps, double* st, bint given,
                          const unsigned char* mask, bint write_padding, floating* params,
                          double* scratch, bint stream) noexcept nogil:
    """Channels-last sample n: its column moments merged per group into st (unless given),
    then its rows.  scratch: 5·C doubles.  (The float64 column sweep: the float32 one
    (column_chunk_moments' sk) measured slower on these narrow rows.)"""
    cdef Py_ssize_t Cg = C // G, g, c, u
    cdef const floating* xn = x + n * S * C
    cdef const unsigned char* m = mask + n * S if mask != NULL else NULL
    cdef double cnt = 0.0
    cdef double* hi = scratch
    cdef double* lo = scratch + C
    cdef double* m2 = scratch + 2 * C
    if not given:
        column_chunk_moments(xn, C, 0, S, C, rows_per_block(C, sizeof(floating)), m, &cnt, hi, lo, m2,
                             scratch + 3 * C, scratch + 4 * C, NULL)
        for g in range(G):
            u = n * G + g
            st[u] = 0.0
            st[NG + u] = 0.0
            st[2 * NG + u] = 0.0
            st[3 * NG + u] = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                merge_one(&st[u], &st[NG + u], &st[2 * NG + u], &st[3 * NG + u], cnt, hi[c],
                          lo[c], m2[c])
    for g in range(G):
        group_params(st, n * G + g, NG, eps, w, b, g * Cg, (g + 1) * Cg, C, params)
    columns_apply(xn, y + n * S * C, S, C, params, m, write_padding, stream)


cdef void columns_apply(const floating* x, floating* y, Py_ssize_t S, Py_ssize_t C,
                        floating* params, const unsigned char* m, bint write_padding,
                        bint stream) noexcept nogil:
    """A channels-last sample's rows, APPLY_ROWS rows at a time so that each block of rows
    stays in cache while ops/group_norm.h goes down it a few columns at a time; padding rows
    are written as 0.  params: 3·C (m_hi, scale, shift), then 3·C of scratch.

    stream: streaming stores of whole lines.  Rows that are whole lines but start h elements
    before a line's start (y not 64-byte aligned) are taken as rows shifted by h: each shifted
    row is aligned and holds channels h, ..., C - 1, 0, ..., h - 1, so the parameters are
    rotated by h once (the scratch) and the first h and last C - h elements go one by one.
    Rows longer than APPLY_COLUMNS, and streamed rows that are not whole lines (or masked and
    not aligned), take BatchNorm's rows (normalize_columns_range)."""
    cdef Py_ssize_t r0 = 0, r1, i, k, h = 0, n = S
    cdef int nt = stream
    cdef const floating* p = params
    cdef floating* q = params + 3 * C
    if stream:
        h = ((64 - (<size_t>y) % 64) % 64) // sizeof(floating)
    if (C > APPLY_COLUMNS
            or (stream and ((C * sizeof(floating)) % 64 or (<size_t>y) % sizeof(floating)
                            or (h and (m != NULL or S < 2))))):
        normalize_columns_range(x, C, y, C, 0, S, C, C, params, m, write_padding, stream)
        return
    if h:
        for k in range(C):
            i = (h + k) % C
            q[k] = p[i]
            q[C + k] = p[C + i]
            q[2 * C + k] = p[2 * C + i]
        for k in range(h):     # the first h elements, then the shifted rows from x + h
            y[k] = (x[k] - p[k]) * p[C + k] + p[2 * C + k]
        for k in range(h, C):  # the last C - h
            i = (S - 1) * C + k
            y[i] = (x[i] - p[k]) * p[C + k] + p[2 * C + k]
        x += h
        y += h
        p = q
        n = S - 1
    while r0 < n:
        r1 = r0 + APPLY_ROWS if r0 + APPLY_ROWS < n else n
        if floating is float:
            cynorm_gn_apply_f(x, y, r0, r1, C, p, p + C, p + 2 * C, m, nt)
        else:
            cynorm_gn_apply_d(x, y, r0, r1, C, p, p + C, p + 2 * C, m, nt)
        if m != NULL and write_padding:
            for i in range(r0, r1):
                if not m[i]:
                    zero_row(y + i * C, C, stream)
        r0 = r1


cdef void _group_norm(const floating* x, floating* y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                      Py_ssize_t G, bint channels_last, const floating* w, const floating* b,
                      double eps, double* st, bint given, const unsigned char* mask,
                      bint write_padding, floating* params, double* scratch,
                      int T) noexcept nogil:
    """The driver: units in contiguous ranges, one per thread (params: 6·C per thread,
    scratch: 5·C doubles per thread)."""
    cdef Py_ssize_t t
    cdef bint stream = streamed(N * C * S * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        group_norm_units(x, y, N, C, S, G, channels_last, w, b, eps, st, given, mask,
                         write_padding, params, scratch, stream, 0, 1)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        group_norm_units(x, y, N, C, S, G, channels_last, w, b, eps, st, given, mask,
                         write_padding, params + 6 * C * t, scratch + 5 * C * t, stream, t,
                         T)


cdef void group_norm_units(const floating* x, floating* y, Py_ssize_t N,
                           Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, bint channels_last,
                           const floating* w, const floating* b, double eps, double* st,
                           bint given, const unsigned char* mask, bint write_padding,
                           floating* params, double* scratch, bint stream, Py_ssize_t t,
                           Py_ssize_t T) noexcept nogil:
    """Thread t of T: its contiguous range of units."""
    cdef Py_ssize_t U = N if channels_last else N * G, u
    for u in range(chunk(U, t, T), chunk(U, t + 1, T)):
        if channels_last:
            group_last_unit(x, y, u, C, S, G, N * G, w, b, eps, st, given, mask,
                            write_padding, params, scratch, stream)
        else:
            group_first_unit(x, y, u, C, S, G, N * G, w, b, eps, st, given, mask,
                             write_padding, params, stream)
    if stream:
        cynorm_sfence()


cdef void group_first_grad(const floating* g, const floating* x, floating* dx, Py_ssize_t u,
                           Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, Py_ssize_t NG,
                           const double* st,
                           const floating* w, bint fixed, const unsigned char* mask,
                           double* sums, bint stream) noexcept nogil:
    """Channels-first unit u = n·G + g: its Cg rows of S (contiguous), by group_unit_grad.
    st (3, N·G): count, mean, rstd per unit; sums (N, 2, C)."""
    cdef Py_ssize_t n = u // G, Cg = C // G, c0 = (u % G) * Cg, i = (n * C + c0) * S
    group_unit_grad(g + i, x + i, dx + i, Cg, S, st[u], st[NG + u], st[2 * NG + u],
                    w + c0 if w != NULL else NULL, fixed, mask + n * S if mask != NULL else NULL,
                    sums + n * 2 * C + c0, sums + n * 2 * C + C + c0, stream)


cdef inline void group_grad_coefs(Py_ssize_t Cg, double cnt, double mean, double* r,
                                  const floating* w, bint fixed, const double* sg,
                                  const double* sgx, floating mh, double* k2,
                                  double* k3) noexcept nogil:
    """A unit's dx coefficients from its channels' Σg, Σg·(x - mean): dx = r·w·g + k2·(x -
    mh) + k3 (r set to 0 for a unit of one real element: its output is the constant b)."""
    cdef Py_ssize_t c
    cdef double s1 = 0.0, s2 = 0.0, wc
    if not fixed and cnt == 1:
        r[0] = 0.0   # one real element: its output is the constant b, so dx = 0 exactly
    for c in range(Cg):
        wc = w[c] if w != NULL else 1.0
        s1 += wc * sg[c]
        s2 += wc * sgx[c]
    k2[0] = 0.0
    k3[0] = 0.0
    if not fixed and cnt > 0:
        k2[0] = -r[0] * r[0] * r[0] * s2 / cnt
        k3[0] = -r[0] * s1 / cnt
    k3[0] = k3[0] + k2[0] * (<double>mh - mean)


cdef void group_unit_grad(const floating* g, const floating* x, floating* dx, Py_ssize_t Cg,
                          Py_ssize_t S, double cnt, double mean, double r, const floating* w,
                          bint fixed, const unsigned char* m, double* sg, double* sgx,
                          bint stream) noexcept nogil:
    """One (sample, group) of Cg channels' rows of S (contiguous; m: the sample's mask, or
    NULL): per channel Σg, Σg·(x - mean) into sg, sgx, then the rows' dx.  w: the group's
    Cg weights, or NULL."""
    cdef Py_ssize_t c
    cdef double wc, k2, k3
    cdef floating mh = <floating>mean
    for c in range(Cg):
        if m == NULL:
            sg[c] = 0.0
            sgx[c] = 0.0
            gx_sums(g + c * S, NULL, x + c * S, S, mean, &sg[c], &sgx[c])
        else:
            masked_gx_sums(g + c * S, x + c * S, S, m, mean, &sg[c], &sgx[c])
    group_grad_coefs(Cg, cnt, mean, &r, w, fixed, sg, sgx, mh, &k2, &k3)
    for c in range(Cg):
        wc = w[c] if w != NULL else 1.0
        group_dx_row(g + c * S, x + c * S, dx + c * S, S, m, mh, <floating>(r * wc),
                     <floating>k2, <floating>k3, not fixed, stream)


cdef void group_last_means(Py_ssize_t n, Py_ssize_t C, Py_ssize_t G, Py_ssize_t NG,
                           const double* st, floating* coef) noexcept nogil:
    """coef[c] = the mean of channel c's group in sample n, in the data's dtype."""
    cdef Py_ssize_t Cg = C // G, c
    for c in range(C):
        coef[c] = <floating>st[NG + n * G + c // Cg]


cdef void group_last_coefs(Py_ssize_t n, Py_ssize_t C, Py_ssize_t G, Py_ssize_t NG,
                           const double* st, const floating* w, bint fixed, double* sg,
                           double* sgx, floating* coef) noexcept nogil:
    """Channels-last sample n, from its column sums sg and Σg·(x - m_hi) in sgx (corrected
    here to Σg·(x - mean)): coef[C:4C], k1, k2, k3 per channel (coef[0:C]: group_last_means)."""
    cdef Py_ssize_t Cg = C // G, grp, c, u
    cdef double cnt, mean, r, s1, s2, wc, k2, k3
    for grp in range(G):
        u = n * G + grp
        cnt = st[u]
        mean = st[NG + u]
        r = st[2 * NG + u]
        if not fixed and cnt == 1:
            r = 0.0   # one real element: its output is the constant b, so dx = 0 exactly
        s1 = 0.0
        s2 = 0.0
        for c in range(grp * Cg, (grp + 1) * Cg):
            # Σg·(x - mean) from Σg·(x - m_hi): + (m_hi - mean)·Σg (nothing to correct, and
            # a NaN mean, for a sample with no real position)
            if cnt > 0:
                sgx[c] += (<double>coef[c] - mean) * sg[c]
            wc = w[c] if w != NULL else 1.0
            s1 += wc * sg[c]
            s2 += wc * sgx[c]
        k2 = 0.0
        k3 = 0.0
        if not fixed and cnt > 0:
            k2 = -r * r * r * s2 / cnt
            k3 = -r * s1 / cnt
        for c in range(grp * Cg, (grp + 1) * Cg):
            wc = w[c] if w != NULL else 1.0
            coef[C + c] = <floating>(r * wc)
            coef[2 * C + c] = <floating>k2
            coef[3 * C + c] = <floating>(k3 + k2 * (<double>coef[c] - mean))


cdef void group_last_grad(const floating* g, const floating* x, floating* dx, Py_ssize_t n,
                          Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, Py_ssize_t NG,
                          const double* st,
                          const floating* w, bint fixed, const unsigned char* mask,
                          double* sums, floating* coef, bint stream) noexcept nogil:
    """Channels-last sample n: column sums into sums (N, 2, C), then its rows' dx.  coef:
    4·C scratch (m_hi, k1, k2, k3 per channel)."""
    cdef const unsigned char* m = mask + n * S if mask != NULL else NULL
    cdef double* sg = sums + n * 2 * C
    cdef Py_ssize_t off = n * S * C
    group_last_means(n, C, G, NG, st, coef)
    bn_sums_columns(g + off, C, x + off, C, 0, S, C, coef, sg, sg + C, m)
    group_last_coefs(n, C, G, NG, st, w, fixed, sg, sg + C, coef)
    bn_dx_range(g + off, C, x + off, C, dx + off, C, 0, S, C, C, False, coef, not fixed, m,
                stream)


cdef void _group_norm_backward(const floating* g, const floating* x, floating* dx, Py_ssize_t N,
                               Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, bint channels_last,
                               const double* st, const floating* w, bint fixed,
                               const unsigned char* mask, double* sums, floating* coef,
                               int T) noexcept nogil:
    cdef Py_ssize_t t
    cdef bint stream = bn_dx_streamed(N * C * S * <Py_ssize_t>sizeof(floating), T)
    if T <= 1:
        group_grad_units(g, x, dx, N, C, S, G, channels_last, st, w, fixed, mask, sums, coef,
                         stream, 0, 1)
        return
    for t in prange(T, num_threads=T, schedule="static", chunksize=1):
        group_grad_units(g, x, dx, N, C, S, G, channels_last, st, w, fixed, mask, sums,
                         coef + 4 * C * t, stream, t, T)


cdef void group_grad_units(const floating* g, const floating* x, floating* dx, Py_ssize_t N,
                           Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, bint channels_last,
                           const double* st, const floating* w, bint fixed,
                           const unsigned char* mask, double* sums, floating* coef,
                           bint stream, Py_ssize_t t, Py_ssize_t T) noexcept nogil:
    """Thread t of T: its contiguous range of units."""
    cdef Py_ssize_t U = N if channels_last else N * G, u
    for u in range(chunk(U, t, T), chunk(U, t + 1, T)):
        if channels_last:
            group_last_grad(g, x, dx, u, C, S, G, N * G, st, w, fixed, mask, sums, coef,
                            stream)
        else:
            group_first_grad(g, x, dx, u, C, S, G, N * G, st, w, fixed, mask, sums, stream)
    if stream:
        cynorm_sfence()


cdef inline void check_group_array(cnp.ndarray a, Py_ssize_t n, bint written) except *:
    if cnp.PyArray_SIZE(a) != n or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"group_norm: expected a contiguous array of {n} elements")
    if written and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError("output array is read-only")


def group_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
               Py_ssize_t G, bint channels_last, cnp.ndarray weight, cnp.ndarray bias,
               double eps, cnp.ndarray stats, bint given, cnp.ndarray mask, bint write_padding,
               int n_threads):
    """GroupNorm of x seen as (N, C, S), or (N, S, C) when channels_last, into y (same layout).

    stats (6, N·G) float64: count, mean as hi + lo, M2 per (sample, group), written; with
    given, read instead (the running statistics of InstanceNorm's eval: count 1, M2 = var);
    then mean and rstd, written.  mask (N, S) bytes or None.  Returns the number of (sample,
    group) with real positions whose rstd is out of the rescue's range (core/rescue.pxi) or
    NaN.
    """
    cdef int f32 = is_float32(x)
    cdef Py_ssize_t NG = N * G
    cdef const unsigned char* mk = mask_data(mask, N * S)
    cdef double* st = float64_data(stats, 6 * NG)
    cdef Py_ssize_t u, bad = 0
    cdef void* w = optional_data(weight, C, f32)
    cdef void* b = optional_data(bias, C, f32)
    cdef int T = max(1, min(n_threads, N if channels_last else NG))
    cdef void* params
    cdef double* scratch
    if G < 1 or C % G or N < 1 or S < 1:
        raise ValueError("group_norm: inconsistent shape")
    check_group_array(x, N * C * S, False)
    check_group_array(y, N * C * S, True)
    if is_float32(y) != f32:
        raise TypeError("group_norm: y's dtype differs from x's")
    params = malloc(6 * C * T * (4 if f32 else 8))
    scratch = <double*>malloc(sizeof(double) * 5 * C * T)
    if params == NULL or scratch == NULL:
        free(params)
        free(scratch)
        raise MemoryError()
    with nogil:
        if f32:
            _group_norm(<const float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(y), N, C, S,
                        G, channels_last, <const float*>w, <const float*>b, eps, st, given, mk,
                        write_padding, <float*>params, scratch, T)
        else:
            _group_norm(<const double*>cnp.PyArray_DATA(x), <double*>cnp.PyArray_DATA(y), N, C,
                        S, G, channels_last, <const double*>w, <const double*>b, eps, st, given,
                        mk, write_padding, <double*>params, scratch, T)
        for u in range(NG):
            bad += st[u] > 0 and rstd_out_of_range(st[5 * NG + u], f32)
    free(params)
    free(scratch)
    return bad


cdef void group_param_grads(Py_ssize_t N, Py_ssize_t C, Py_ssize_t G, const double* st,
                            const double* sums, floating* gw, floating* gb) noexcept nogil:
    """dw = Σ_n rstd·Σg·(x - mean), db = Σ_n Σg per channel, over the samples in order
    (samples with no real position add nothing); gw or gb may be NULL."""
    cdef Py_ssize_t NG = N * G, Cg = C // G, c, n, u
    cdef double sw, sb
    for c in range(C):
        sw = 0.0
        sb = 0.0
        for n in range(N):
            u = n * G + c // Cg
            sb += sums[n * 2 * C + c]
            if st[u] > 0:
                sw += st[2 * NG + u] * sums[n * 2 * C + C + c]
        if gw != NULL:
            gw[c] = <floating>sw
        if gb != NULL:
            gb[c] = <floating>sb


def group_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t N,
                        Py_ssize_t C, Py_ssize_t S, Py_ssize_t G, bint channels_last,
                        cnp.ndarray stats, cnp.ndarray weight, bint fixed, cnp.ndarray sums,
                        cnp.ndarray grad_weight, cnp.ndarray grad_bias, cnp.ndarray mask,
                        int n_threads, int half=-1):
    """dx of GroupNorm (layout as group_norm), and sums (N, 2, C) float64: per (sample,
    channel) Σg and Σg·(x - mean) over the real positions; grad_weight, grad_bias (C,) (or
    None) receive dw and db from them.

    stats (3, N·G) float64: count, mean and rstd per (sample, group).  fixed: the
    statistics are constants (InstanceNorm with running statistics): dx = g·w·rstd.  Returns
    the number of (sample, group) with real positions whose rstd is out of the rescue's range
    or NaN.  half (HALF_F16, HALF_BF16; -1: none): g, x and dx are 16-bit of that kind, the
    parameters and their gradients float32 (ops/group_norm_half.pxi).
    """
    cdef int f32 = 1 if half >= 0 else is_float32(x)
    cdef Py_ssize_t NG = N * G
    cdef const unsigned char* mk = mask_data(mask, N * S)
    cdef double* st = float64_data(stats, 3 * NG, False)
    cdef double* sm = float64_data(sums, 2 * N * C)
    cdef void* w = optional_data(weight, C, f32)
    cdef void* gw = optional_data(grad_weight, C, f32)
    cdef void* gb = optional_data(grad_bias, C, f32)
    cdef int T = max(1, min(n_threads, N if channels_last else NG))
    cdef void* coef = NULL
    cdef Py_ssize_t u, bad = 0
    if G < 1 or C % G or N < 1 or S < 1:
        raise ValueError("group_norm_backward: inconsistent shape")
    check_group_array(g, N * C * S, False)
    check_group_array(x, N * C * S, False)
    check_group_array(dx, N * C * S, True)
    if half >= 0:
        run_half_group_norm_backward(g, x, dx, N, C, S, G, channels_last, st, <const float*>w,
                                     fixed, sm, mk, half, T)
    elif is_float32(g) != f32 or is_float32(dx) != f32:
        raise TypeError("group_norm_backward: arrays of different dtypes")
    else:
        coef = malloc(4 * C * T * (4 if f32 else 8))
        if coef == NULL:
            raise MemoryError()
    with nogil:
        if half >= 0:
            group_param_grads(N, C, G, st, sm, <float*>gw, <float*>gb)
        elif f32:
            _group_norm_backward(<const float*>cnp.PyArray_DATA(g),
                                 <const float*>cnp.PyArray_DATA(x), <float*>cnp.PyArray_DATA(dx),
                                 N, C, S, G, channels_last, st, <const float*>w, fixed, mk, sm,
                                 <float*>coef, T)
            group_param_grads(N, C, G, st, sm, <float*>gw, <float*>gb)
        else:
            _group_norm_backward(<const double*>cnp.PyArray_DATA(g),
                                 <const double*>cnp.PyArray_DATA(x),
                                 <double*>cnp.PyArray_DATA(dx), N, C, S, G, channels_last, st,
                                 <const double*>w, fixed, mk, sm, <double*>coef, T)
            group_param_grads(N, C, G, st, sm, <double*>gw, <double*>gb)
        for u in range(NG):
            bad += st[u] > 0 and rstd_out_of_range(st[2 * NG + u], f32)
    free(coef)
    return bad
