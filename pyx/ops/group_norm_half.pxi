# GroupNorm and InstanceNorm forward on 16-bit input (float16, bfloat16: kind), the units of
# ops/group_norm.pxi: their rows widened to float32 for the moments (those of a float32 copy of
# x), then written by BatchNorm's 16-bit affine (core/halves_affine.pxi: float32, and float64
# where the shift cancels the product) while they are still in cache.

cdef void zero_padding_half(uint16_t* y, Py_ssize_t S, const unsigned char* m) noexcept nogil:
    """The padding runs of a channels-first row set to 0."""
    cdef Py_ssize_t a, b = 0
    while b < S:
        a = run_from(m, b, S, True)
        b = run_from(m, a, S, False)
        if b > a:
            memset(y + a, 0, (b - a) * sizeof(uint16_t))


cdef void half_params(double* st, Py_ssize_t NG, Py_ssize_t n, Py_ssize_t G, Py_ssize_t g0,
                      Py_ssize_t g1, Py_ssize_t Cg, const float* w, const float* b, double eps,
                      bint rests, double* work) noexcept nogil:
    """Groups g0..g1 of sample n: their mean and rstd into st's rows 4 and 5 (NaN without a
    real position), and the 16-bit affine's parameters of their channels into work: (3, F)
    doubles of statistics (each channel's group mean as hi + lo, its variance), then
    half_affine_params' (3, F) doubles and (HALF_PARAM_ROWS, F) floats (F = (g1 - g0)·Cg
    channels from channel g0·Cg).  rests: st's row 4 holds each group's exact mlo
    (group_half_first's), read before the means are written there."""
    cdef Py_ssize_t F = (g1 - g0) * Cg, g, c, u
    cdef double count, var
    for g in range(g0, g1):
        u = n * G + g
        count = st[u]
        var = st[3 * NG + u] / count
        for c in range((g - g0) * Cg, (g - g0 + 1) * Cg):
            work[c] = st[NG + u]
            work[F + c] = st[2 * NG + u]
            work[2 * F + c] = var
    # st's rstd row from there, the roots taken once
    half_affine_params(work, 1.0, w + g0 * Cg if w != NULL else NULL,
                       b + g0 * Cg if b != NULL else NULL, eps, F, 1, work + 3 * F,
                       st + 5 * NG + n * G + g0, Cg, 0, -1,
                       st + 4 * NG + n * G + g0 if rests else NULL)
    for g in range(g0, g1):
        u = n * G + g
        st[4 * NG + u] = st[NG + u] + st[2 * NG + u] if st[u] > 0 else NAN
        if not st[u] > 0:
            st[5 * NG + u] = NAN


cdef inline Py_ssize_t half_group_batch(Py_ssize_t Cg, Py_ssize_t S,
                                        Py_ssize_t G) noexcept nogil:
    """Channels-first groups of a sample taken as one batch (group_half_first): about
    HALF_GROUP_BYTES of x, at least one group, at most G."""
    cdef Py_ssize_t k = HALF_GROUP_BYTES // (2 * Cg * S)
    return 1 if k < 1 else (G if k > G else k)


cdef void group_half_first(const uint16_t* x, uint16_t* y, Py_ssize_t n, Py_ssize_t g0,
                           Py_ssize_t g1, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                           Py_ssize_t NG, const float* w, const float* b, double eps,
                           double* st, bint given, const unsigned char* mask, double* work,
                           float* scratch, int kind) noexcept nogil:
    """Channels-first groups g0..g1 of sample n (units n·G + g): each one's moments into st
    (unless given), those of its Cg·S elements as one row widened in registers
    (row_moments_half), or with a mask its channels' rows widened into scratch (S floats) one
    at a time and merged in channel order; then the parameters of their F = (g1 - g0)·Cg
    channels in one call (half_params), and their rows, the padding set to 0 after.  work:
    6·F doubles + HALF_PARAM_ROWS·F floats."""
    cdef Py_ssize_t Cg = C // G, F = (g1 - g0) * Cg, g, c, u
    cdef const uint16_t* xb = x + (n * C + g0 * Cg) * S
    cdef uint16_t* yb = y + (n * C + g0 * Cg) * S
    cdef const uint16_t* xg
    cdef const unsigned char* m = mask + n * S if mask != NULL else NULL
    cdef double cnt, hi, lo, m2
    cdef double sums[2]
    if not given:
        for g in range(g0, g1):
            u = n * G + g
            xg = xb + (g - g0) * Cg * S
            cnt = 0.0
            hi = 0.0
            lo = 0.0
            m2 = 0.0
            if m == NULL:   # the unit's Cg·S elements as one row
                row_moments_half(xg, Cg * S, kind, &hi, &lo, &m2, sums)
                cnt = <double>(Cg * S)
                # the mean's exact rest (core/moments.pxi), held in row 4 for half_params
                st[4 * NG + u] = mean_rest(hi, sums[0], sums[1], cnt, 1.0 / cnt, hi + lo)
            else:
                for c in range(Cg):
                    cynorm_widen_half(xg + c * S, scratch, S, kind)
                    masked_moments(<const float*>scratch, S, m, &cnt, &hi, &lo, &m2)
            st[u] = cnt
            st[NG + u] = hi
            st[2 * NG + u] = lo
            st[3 * NG + u] = m2
    half_params(st, NG, n, G, g0, g1, Cg, w, b, eps, not given and m == NULL, work)
    half_affine_rows(xb, S, yb, S, 0, F, S, True, work + 3 * F, F, NULL, False, scratch, kind)
    if m != NULL:
        for c in range(F):
            zero_padding_half(yb + c * S, S, m)


cdef void group_half_last(const uint16_t* x, uint16_t* y, Py_ssize_t n, Py_ssize_t C,
                          Py_ssize_t S, Py_ssize_t G, Py_ssize_t NG, const float* w,
                          const float* b, double eps, double* st, bint given,
                          const unsigned char* mask, bint write_padding, double* work,
                          float* scratch, int kind) noexcept nogil:
    """Channels-last sample n: its column moments (core/columns.pxi's float64 sweep, the rows
    widened in registers), merged per group into st (unless given); then its rows by the
    16-bit affine with per-channel parameters (half_affine_rows' blocks of rows).  work: 16·C
    doubles; scratch: rows_per_block(C) rows of C floats (at least AFFINE_CHUNK)."""
    cdef Py_ssize_t Cg = C // G, R = rows_per_block(C, sizeof(float)), g, c, u
    cdef const uint16_t* xn = x + n * S * C
    cdef uint16_t* yn = y + n * S * C
    cdef const unsigned char* m = mask + n * S if mask != NULL else NULL
    cdef double cnt = 0.0
    cdef double* hi = work           # the sample's columns: hi, lo, M2
    cdef double* lo = work + C
    cdef double* m2 = work + 2 * C
    cdef double* blk = work + 3 * C  # column_chunk_moments' c and q
    cdef double* par = work + 8 * C  # half_params' (3, C) statistics, (3, C) params, floats
    if not given:
        column_chunk_moments(<const float*>NULL, C, 0, S, C, R, m, &cnt, hi, lo, m2, blk,
                             blk + C, NULL, xn, kind, scratch)
        for g in range(G):
            u = n * G + g
            st[u] = 0.0
            st[NG + u] = 0.0
            st[2 * NG + u] = 0.0
            st[3 * NG + u] = 0.0
            for c in range(g * Cg, (g + 1) * Cg):
                merge_one(&st[u], &st[NG + u], &st[2 * NG + u], &st[3 * NG + u], cnt, hi[c],
                          lo[c], m2[c])
    half_params(st, NG, n, G, 0, G, Cg, w, b, eps, False, par)
    half_affine_rows(xn, C, yn, C, 0, S, C, False, par + 3 * C, C, m, write_padding, scratch,
                     kind)


cdef void group_half_units(const uint16_t* x, uint16_t* y, Py_ssize_t N, Py_ssize_t C,
                           Py_ssize_t S, Py_ssize_t G, bint channels_last, const float* w,
                           const float* b, double eps, double* st, bint given,
                           const unsigned char* mask, bint write_padding, double* work,
                           float* scratch, int kind, Py_ssize_t t,
                           Py_ssize_t T) noexcept nogil:
    """Thread t of T: its contiguous range of units, channels-first in batches of groups of
    one sample (half_group_batch)."""
    cdef Py_ssize_t U = N if channels_last else N * G, u, ue = chunk(U, t + 1, T), g0, g1
    cdef Py_ssize_t gb = half_group_batch(C // G, S, G)
    if channels_last:
        for u in range(chunk(U, t, T), ue):
            group_half_last(x, y, u, C, S, G, N * G, w, b, eps, st, given, mask,
                            write_padding, work, scratch, kind)
        return
    u = chunk(U, t, T)
    while u < ue:   # batches of groups of one sample
        g0 = u % G
        g1 = min(G, g0 + gb, g0 + (ue - u))
        group_half_first(x, y, u // G, g0, g1, C, S, G, N * G, w, b, eps, st, given, mask,
                         work, scratch, kind)
        u += g1 - g0


def group_norm_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                    Py_ssize_t G, bint channels_last, cnp.ndarray weight, cnp.ndarray bias,
                    double eps, cnp.ndarray stats, bint given, cnp.ndarray mask,
                    bint write_padding, int kind, int n_threads):
    """group_norm on 16-bit x and y (kind HALF_F16 or HALF_BF16), weight and bias float32 (or
    None), the other arguments as group_norm's: the moments those of a float32 copy of x, each
    output computed in float32, and again in float64 where the shift cancels the product
    (core/halves.h), then rounded once to the 16-bit type."""
    cdef Py_ssize_t NG = N * G, Cg, t, K, nwork, nscratch
    cdef const unsigned char* mk = mask_data(mask, N * S)
    cdef double* st = float64_data(stats, 6 * NG)
    cdef const float* w = <const float*>optional_data(weight, C, 1)
    cdef const float* b = <const float*>optional_data(bias, C, 1)
    cdef int T = max(1, min(n_threads, N if channels_last else NG))
    cdef double* work
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(x) or not is_bits16(y):
        raise TypeError("group_norm_half takes x and y as 16-bit float (or uint16) arrays")
    if G < 1 or C % G or N < 1 or S < 1:
        raise ValueError("group_norm_half: inconsistent shape")
    check_group_array(x, N * C * S, False)
    check_group_array(y, N * C * S, True)
    Cg = C // G
    if channels_last:
        nwork = 16 * C
        nscratch = rows_per_block(C, sizeof(float)) * C
    else:
        K = half_group_batch(Cg, S, G) * Cg   # a batch's channels
        nwork = 6 * K + (HALF_PARAM_ROWS * K + 1) // 2
        nscratch = S
    nscratch = (nscratch if nscratch > AFFINE_CHUNK else AFFINE_CHUNK) // 2 + 1   # doubles
    work = <double*>malloc(sizeof(double) * T * (nwork + nscratch))
    if work == NULL:
        raise MemoryError()
    with nogil:
        if T <= 1:
            group_half_units(<const uint16_t*>cnp.PyArray_DATA(x),
                             <uint16_t*>cnp.PyArray_DATA(y), N, C, S, G, channels_last, w, b,
                             eps, st, given, mk, write_padding, work,
                             <float*>(work + T * nwork), kind, 0, 1)
        else:
            for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                group_half_units(<const uint16_t*>cnp.PyArray_DATA(x),
                                 <uint16_t*>cnp.PyArray_DATA(y), N, C, S, G, channels_last, w,
                                 b, eps, st, given, mk, write_padding, work + t * nwork,
                                 <float*>(work + T * nwork + t * nscratch), kind, t, T)
    free(work)


# ---------------------------------------------------------------------------------------------
# Backward on 16-bit g and x, dx written as 16-bit.  An unmasked channels-first unit is read in
# 16 bits, its sums and dx widened in registers (group_half_unit_grad); the other units run
# the float32 backward's over widened rows (core/halves_backward.pxi): a masked channels-first
# unit's Cg rows at once (group_unit_grad); channels-last, the sample B rows at a time, once
# for its column sums and once for its dx (bn_sums_columns accumulating over whole fours of
# rows: the bits of one sweep over all of them).  dx and the sums are those of the float32
# backward of widened copies, to the bit.

cdef void group_half_unit_grad(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                               Py_ssize_t Cg, Py_ssize_t S, double cnt, double mean, double r,
                               const float* w, bint fixed, double* sg, double* sgx,
                               int kind) noexcept nogil:
    """group_unit_grad of an unmasked unit on 16-bit g, x and dx, widened in registers: its
    sums (cynorm_gx_sums_half) and dx rows (cynorm_bn_dx_half) compute what the float32 unit
    computes on widened copies, to the bit."""
    cdef Py_ssize_t c
    cdef double wc, k2, k3
    cdef float mh = <float>mean
    for c in range(Cg):
        cynorm_gx_sums_half(g + c * S, x + c * S, S, mean, &sg[c], &sgx[c], kind)
    group_grad_coefs(Cg, cnt, mean, &r, w, fixed, sg, sgx, mh, &k2, &k3)
    for c in range(Cg):
        wc = w[c] if w != NULL else 1.0
        cynorm_bn_dx_half(g + c * S, x + c * S, dx + c * S, S, mh, <float>(r * wc),
                          <float>k2, <float>k3, not fixed, kind)


cdef void group_half_grad_units(const uint16_t* g, const uint16_t* x, uint16_t* dx,
                                Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, Py_ssize_t G,
                                bint channels_last, const double* st, const float* w,
                                bint fixed, const unsigned char* mask, double* sums,
                                float* scratch, Py_ssize_t B, int kind, Py_ssize_t t,
                                Py_ssize_t T) noexcept nogil:
    """Thread t of T: its contiguous range of units.  scratch: 3·Cg·S floats (channels-first
    with a mask) or 4·C + 3·B·C (channels-last: the coefficients, then B rows each of g, x and
    dx)."""
    cdef Py_ssize_t NG = N * G, Cg = C // G, U = N if channels_last else NG, u, n, i, r0, r1
    cdef Py_ssize_t E = Cg * S
    cdef float* coef = scratch
    cdef float* gs
    cdef float* xs
    cdef float* ds
    cdef const unsigned char* m
    cdef double* sg
    for u in range(chunk(U, t, T), chunk(U, t + 1, T)):
        if not channels_last and mask == NULL:
            n = u // G
            i = (n * C + (u % G) * Cg) * S
            group_half_unit_grad(g + i, x + i, dx + i, Cg, S, st[u], st[NG + u],
                                 st[2 * NG + u], w + (u % G) * Cg if w != NULL else NULL,
                                 fixed, sums + n * 2 * C + (u % G) * Cg,
                                 sums + n * 2 * C + C + (u % G) * Cg, kind)
            continue
        if not channels_last:
            n = u // G
            i = (n * C + (u % G) * Cg) * S
            cynorm_widen_half(g + i, scratch, E, kind)
            cynorm_widen_half(x + i, scratch + E, E, kind)
            group_unit_grad(<const float*>scratch, <const float*>(scratch + E), scratch + 2 * E,
                            Cg, S, st[u], st[NG + u], st[2 * NG + u],
                            w + (u % G) * Cg if w != NULL else NULL, fixed,
                            mask + n * S if mask != NULL else NULL,
                            sums + n * 2 * C + (u % G) * Cg, sums + n * 2 * C + C + (u % G) * Cg,
                            False)
            cynorm_narrow_half(scratch + 2 * E, dx + i, E, kind)
            continue
        # channels-last sample u
        m = mask + u * S if mask != NULL else NULL
        sg = sums + u * 2 * C
        gs = scratch + 4 * C
        xs = gs + B * C
        ds = xs + B * C
        i = u * S * C
        group_last_means(u, C, G, NG, st, coef)
        memset(sg, 0, 2 * C * sizeof(double))
        r0 = 0
        while r0 < S:
            r1 = min(r0 + B, S)
            widen_rows(g + i, C, r0, r1, C, gs, kind)
            widen_rows(x + i, C, r0, r1, C, xs, kind)
            bn_sums_columns(<const float*>gs, C, <const float*>xs, C, r0, r1, C, coef, sg,
                            sg + C, m, NULL, 0, NULL, False, r0, True)
            r0 = r1
        group_last_coefs(u, C, G, NG, st, w, fixed, sg, sg + C, coef)
        r0 = 0
        while r0 < S:
            r1 = min(r0 + B, S)
            widen_rows(g + i, C, r0, r1, C, gs, kind)
            widen_rows(x + i, C, r0, r1, C, xs, kind)
            bn_dx_range(<const float*>gs, C, <const float*>xs, C, ds, C, r0, r1, C, C, False,
                        coef, not fixed, m, False, r0)
            narrow_rows(ds, dx + i, C, r0, r1, C, kind)
            r0 = r1


cdef Py_ssize_t run_half_group_norm_backward(cnp.ndarray g, cnp.ndarray x, cnp.ndarray dx,
                                             Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                                             Py_ssize_t G, bint channels_last,
                                             const double* st, const float* w, bint fixed,
                                             double* sm, const unsigned char* mk, int kind,
                                             int T) except -1:
    """group_norm_backward's units on 16-bit g, x and dx (the entry point checked the rest)."""
    cdef Py_ssize_t B = half_backward_rows(C, S), per_thread, t
    cdef float* scratch
    cdef const uint16_t* gp = <const uint16_t*>cnp.PyArray_DATA(g)
    cdef const uint16_t* xp = <const uint16_t*>cnp.PyArray_DATA(x)
    cdef uint16_t* dxp = <uint16_t*>cnp.PyArray_DATA(dx)
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(g) or not is_bits16(x) or not is_bits16(dx):
        raise TypeError("group_norm_backward: g, x and dx must be 16-bit arrays")
    if channels_last:
        per_thread = 4 * C + 3 * B * C
    else:   # unmasked units need none (group_half_unit_grad)
        per_thread = 3 * (C // G) * S if mk != NULL else 1
    per_thread = (per_thread + 15) // 16 * 16
    scratch = <float*>malloc(sizeof(float) * T * per_thread)
    if scratch == NULL:
        raise MemoryError()
    with nogil:
        if T <= 1:
            group_half_grad_units(gp, xp, dxp, N, C, S, G, channels_last, st, w, fixed, mk, sm,
                                  scratch, B, kind, 0, 1)
        else:
            for t in prange(T, num_threads=T, schedule="static", chunksize=1):
                group_half_grad_units(gp, xp, dxp, N, C, S, G, channels_last, st, w, fixed, mk,
                                      sm, scratch + t * per_thread, B, kind, t, T)
    free(scratch)
    return 0
