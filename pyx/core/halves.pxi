# Core: the row normalizer on 16-bit floats (float16, bfloat16), forward.
#
# A row's statistics are read from its 16-bit elements, widened in registers (row_stats_half:
# the float64 sums of the float32 row normalizer, core/rows.pxi, to the bit), and its output
# is computed from them again, in float32 as the float rows compute it (core/halves_rows.h),
# and narrowed once, rounding to nearest even, straight into y (streamed for outputs far
# larger than the cache).  A row the float32 rescue would redo (its statistics out of float32's
# range) is widened into a per-thread float32 scratch row first and takes norm_row's steps
# there.  Each row is read in full (for its statistics) before any of its outputs is written,
# and each output block after its own inputs, so y (and h) may be x (or residual) themselves,
# row for row, as for the float rows.
#
# The residual-add forms: h = x + residual in float32, rounded once to the 16-bit type and
# written out (torch's add in half precision); the rounded h, widened into the scratch row as
# it is made, is what is normalized.

cdef extern from "core/halves.h" nogil:
    enum:
        HALF_F16 "CYNORM_F16"
        HALF_BF16 "CYNORM_BF16"
    void cynorm_widen_half(const uint16_t* s, float* d, Py_ssize_t n, int kind) noexcept
    void cynorm_narrow_half(const float* s, uint16_t* d, Py_ssize_t n, int kind) noexcept
    void cynorm_copy_nt_h(const uint16_t* x, uint16_t* y, Py_ssize_t n) noexcept
    void cynorm_add_half(const uint16_t* x, const uint16_t* r, uint16_t* h, float* s,
                         Py_ssize_t n, int kind) noexcept
    float cynorm_half2f(uint16_t h, int kind) noexcept
    uint16_t cynorm_d2half(double d, int kind) noexcept
    void cynorm_affine_half(const uint16_t* x, uint16_t* y, Py_ssize_t n, const double* m,
                            const double* s, const double* t, const float* mf, const float* sf,
                            const float* tf, int per_elem, float* scratch, int kind) noexcept
    void cynorm_affine_cols_half(const uint16_t* x, Py_ssize_t ldx, uint16_t* y,
                                 Py_ssize_t ldy, Py_ssize_t rows, Py_ssize_t cols,
                                 const double* m, const double* s, const double* t,
                                 const float* mf, const float* sf, const float* tf,
                                 float* scratch, int kind) noexcept


cdef extern from "core/halves_rows.h" nogil:
    # the row's 16-bit output, from its float32 copy or from the 16-bit row itself
    void cynorm_apply_half(const float* x, uint16_t* y, Py_ssize_t n, float mh, float ml,
                           float rs, double m, double mlo, double rsd, const float* w,
                           const float* b, int kind, int stream) noexcept
    void cynorm_apply_half16(const uint16_t* x, uint16_t* y, Py_ssize_t n, float mh, float ml,
                             float rs, double m, double mlo, double rsd, const float* w,
                             const float* b, int kind, int stream) noexcept


cdef extern from "core/halves_sums.h" nogil:
    # core/sums.h's row sums on 16-bit rows (the float32 copy's bits), and the dx row
    void cynorm_shifted_sums_half(const uint16_t* x, Py_ssize_t n, double shift, double* s1,
                                  double* s2, int kind) noexcept
    void cynorm_gx_sums_half(const uint16_t* g, const uint16_t* x, Py_ssize_t n, double shift,
                             double* s1, double* s2, int kind) noexcept
    void cynorm_bn_dx_half(const uint16_t* g, const uint16_t* x, uint16_t* dx, Py_ssize_t n,
                           float mh, float k1, float k2, float k3, int training,
                           int kind) noexcept


cdef extern from "numpy/ndarraytypes.h":
    enum: NPY_USERDEF   # the first type number of a user dtype (ml_dtypes' bfloat16)


cdef inline bint is_bits16(cnp.ndarray a) noexcept:
    """Whether a holds 16-bit floats' bits: uint16, float16 or a 2-byte user dtype (bfloat16)."""
    cdef int t = cnp.PyArray_TYPE(a)
    return cnp.PyArray_ITEMSIZE(a) == 2 and (
        t == cnp.NPY_UINT16 or t == cnp.NPY_FLOAT16 or t >= NPY_USERDEF)


cdef inline void block_moments_half(const uint16_t* x, Py_ssize_t n, int kind, double* hi,
                                    double* lo, double* m2, double* s1) noexcept nogil:
    """core/moments.pxi's block_moments of a 16-bit block, widened in registers
    (core/halves_sums.h's shifted sums): the same statements, for the same bits; s1[0] + s1[1]
    the block's Σ(x - hi) itself (exact: Σ(x - x[0]) is, for 16-bit blocks whose differences
    span under 53 bits; and so is its move to a far shift's new hi, add_part_sum's, but for
    2^-106 of it)."""
    cdef double x0 = cynorm_half2f(x[0], kind), shift = x0, s = 0.0, q = 0.0, e = 0.0
    cdef double inv_n = 1.0 / n
    cynorm_shifted_sums_half(x, n, shift, &s, &q, kind)
    finish_block(shift, s, q, inv_n, hi, lo, m2)
    s1[0] = s
    s1[1] = 0.0
    if not far_shift(lo[0], s, m2[0]):
        return
    shift = hi[0] + lo[0]
    s = 0.0
    q = 0.0
    cynorm_shifted_sums_half(x, n, shift, &s, &q, kind)
    finish_block(shift, s, q, inv_n, hi, lo, m2)
    e = s1[0]
    s1[0] = 0.0
    add_part_sum(&s1[0], &s1[1], e, 0.0, <double>n, x0, shift)


cdef void row_moments_half(const uint16_t* x, Py_ssize_t n, int kind, double* hi,
                          double* lo, double* m2, double* sums) noexcept nogil:
    """core/moments.pxi's row_moments of a contiguous 16-bit row of n >= 1 elements, its
    statements on block_moments_half: the bits of row_moments on the row's widened copy.

    sums (unless NULL): Σ(x - hi) in two floats (block_moments_half's, merged exactly), the
    mean to far finer than hi + lo, good to 2^-53 of |lo| (core/moments.pxi's mean_rest)."""
    cdef double count, bhi = 0.0, blo = 0.0, bm2 = 0.0, th, tl
    cdef double s[2]
    cdef Py_ssize_t start, nb
    nb = n if n < BLOCK else BLOCK
    block_moments_half(x, nb, kind, hi, lo, m2, s)
    th = s[0]
    tl = s[1]
    count = <double>nb
    start = nb
    while start < n:
        nb = n - start if n - start < BLOCK else BLOCK
        block_moments_half(x + start, nb, kind, &bhi, &blo, &bm2, s)
        chan_merge(&count, lo, m2, <double>nb, (bhi - hi[0]) + blo, bm2)
        if sums != NULL:
            add_part_sum(&th, &tl, s[0], s[1], <double>nb, bhi, hi[0])
        start += nb
    if sums != NULL:
        sums[0] = th
        sums[1] = tl


cdef inline void row_stats_half(const uint16_t* x, Py_ssize_t n, bint centred, int kind,
                               double* hi, double* lo, double* m2, double* sums) noexcept nogil:
    """core/rows.pxi's row_stats of a 16-bit row, widened in registers: the bits of row_stats
    on the row's widened copy; sums (unless NULL) as row_moments_half's, 0 uncentred."""
    cdef double s = 0.0
    if centred:
        row_moments_half(x, n, kind, hi, lo, m2, sums)
    else:
        hi[0] = 0.0
        lo[0] = 0.0
        if sums != NULL:
            sums[0] = 0.0
            sums[1] = 0.0
        cynorm_shifted_sums_half(x, n, 0.0, &s, m2, kind)   # square_sum's sums


cdef inline void put_half_row(const float* ys, uint16_t* y, uint16_t* hs, Py_ssize_t n,
                              int kind, bint stream) noexcept nogil:
    """y[0:n] = ys narrowed: directly, or through hs with streaming stores."""
    if stream:
        cynorm_narrow_half(ys, hs, n, kind)
        cynorm_copy_nt_h(hs, y, n)
    else:
        cynorm_narrow_half(ys, y, n, kind)


cdef inline void apply_half_chunk(const float* xs, const uint16_t* xh, uint16_t* y,
                                  Py_ssize_t n, float mh, float ml, float rs, double m,
                                  double mlo, double rsd, const float* w, const float* b,
                                  int kind, bint stream) noexcept nogil:
    """n outputs from the 16-bit row xh itself, or (xh NULL) from its widened copy xs."""
    if xh != NULL:
        cynorm_apply_half16(xh, y, n, mh, ml, rs, m, mlo, rsd, w, b, kind, stream)
    else:
        cynorm_apply_half(xs, y, n, mh, ml, rs, m, mlo, rsd, w, b, kind, stream)


cdef inline void apply_half_row(const float* xs, const uint16_t* xh, uint16_t* y, Py_ssize_t n,
                                float mh, float ml, float rs, double m, double mlo, double rsd,
                                const float* w, const float* b, int kind, bint stream,
                                const uint16_t* nxt) noexcept nogil:
    """A row's 16-bit output from the row xh itself, or (xh NULL) from its widened row xs;
    with nxt (the next input row, else NULL), in chunks that start on y's lines, each after a
    prefetch of the same part of nxt (as the float rows' apply_prefetching: the next row's
    statistics then read the cache)."""
    cdef Py_ssize_t c0 = 0, c1, k
    cdef Py_ssize_t e = <Py_ssize_t>((-<Py_ssize_t>y) & (CYNORM_LINE_BYTES - 1)) // 2
    if nxt == NULL:
        apply_half_chunk(xs, xh, y, n, mh, ml, rs, m, mlo, rsd, w, b, kind, stream)
        return
    while c0 < n:
        c1 = e + PREFETCH_CHUNK if e + PREFETCH_CHUNK < n else n
        k = c0 * 2
        while k < c1 * 2:
            cynorm_prefetch(<const char*>nxt + k)
            k += CYNORM_LINE_BYTES
        apply_half_chunk(xs + c0, xh + c0 if xh != NULL else NULL, y + c0, c1 - c0, mh, ml,
                         rs, m, mlo, rsd, w + c0 if w != NULL else NULL,
                         b + c0 if b != NULL else NULL, kind, stream)
        c0 = c1
        e = c1


cdef void half_norm_rows(const uint16_t* x, Py_ssize_t ldx, uint16_t* y, Py_ssize_t ldy,
                         Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t D, const float* w,
                         const float* b, double eps, bint centred, double* mean, double* rstd,
                         const unsigned char* mask, bint write_padding, bint stream,
                         Py_ssize_t ahead, const uint16_t* res, Py_ssize_t ldr, uint16_t* h,
                         Py_ssize_t ldh, float* scratch, int kind) noexcept nogil:
    # scratch: this thread's 2·D floats then D 16-bit elements (the widened row; the float32
    # output of a row redone by the rescue; a streamed row's h or output before its copy
    # out).  Padding rows (mask
    # 0): y written as 0 (unless write_padding is off), statistics left alone; h is written
    # for every row.  ahead > 0: row i + ahead of x is prefetched while row i is written.
    cdef float* xs = scratch
    cdef float* ys = scratch + D
    cdef uint16_t* hs = <uint16_t*>(scratch + 2 * D)
    cdef Py_ssize_t i
    cdef double hi, lo, mlo = 0.0, m2, rsd, inv_d = 1.0 / D
    cdef double sums[2]
    cdef double* dsums = sums if b != NULL else NULL
    cdef float mh, ml, rs
    cdef bint direct
    for i in range(r0, r1):
        if res != NULL:
            # h's row (through hs when streamed) and, in xs, its rounded values widened
            cynorm_add_half(x + i * ldx, res + i * ldr, hs if stream else h + i * ldh, xs, D,
                            kind)
            if stream:
                cynorm_copy_nt_h(hs, h + i * ldh, D)
        if mask != NULL and not mask[i]:
            if write_padding:
                memset(y + i * ldy, 0, D * sizeof(uint16_t))
            continue
        hi = 0.0
        lo = 0.0
        m2 = 0.0
        # the statistics from the 16-bit row (x, or h: its widened values are xs, the same
        # bits); a row that row_scale redoes scaled (out of float32's range) from its copy
        if res == NULL:
            row_stats_half(x + i * ldx, D, centred, kind, &hi, &lo, &m2, dsums)
            direct = not f32_rescaled(m2, D, eps)
            if not direct:
                cynorm_widen_half(x + i * ldx, xs, D, kind)
        else:
            row_stats_half(hs if stream else h + i * ldh, D, centred, kind, &hi, &lo, &m2,
                           dsums)
            direct = False
        rsd = 1.0 / sqrt(m2 / D + eps)
        # the mean rounded to one float64 first (hi + lo, 0): an element equal to the mean
        # then gives 0, as the exact result does, and not lo's last bits, which bfloat16's
        # range would keep (a row's hi + lo may differ from the exact mean by 1e-21 of it).
        # What the rounding left out, mlo (exact, from the sums), serves only the lanes a
        # bias makes redone in float64, where it cancels the product far below m's rounding.
        if dsums != NULL:
            mlo = mean_rest(hi, sums[0], sums[1], <double>D, inv_d, hi + lo)
        hi = hi + lo
        if row_scale(<const float*>xs, ys, D, w, b, eps, centred, hi, 0.0, m2, rsd,
                     mean + i if mean != NULL else NULL, rstd + i if rstd != NULL else NULL,
                     False, &mh, &ml, &rs):
            put_half_row(ys, y + i * ldy, hs, D, kind, stream)   # redone by the rescue
        else:
            # the mean and rstd in float64 too, for the lanes redone in float64 (rstd NaN
            # where row_scale made it so: a non-finite row)
            apply_half_row(xs, x + i * ldx if direct else NULL, y + i * ldy, D, mh, ml, rs,
                           hi, mlo, rsd if rs == rs else NAN, w, b, kind, stream,
                           x + (i + ahead) * ldx if ahead > 0 and i + ahead < r1 else NULL)
    if stream:
        cynorm_sfence()


cdef inline Py_ssize_t half_rows_scratch(Py_ssize_t D) noexcept nogil:
    """Floats of a thread's scratch for half_norm_rows: 2·D floats and D 16-bit elements,
    rounded up to whole 64-byte lines."""
    return ((2 * D * 4 + D * 2 + 63) // 64) * 16


cdef inline const float* thread_param(const float* p, const uint16_t* p16, Py_ssize_t D,
                                      float* room, int kind) noexcept nogil:
    """A parameter as float32: p, or the 16-bit p16 widened into room, the calling thread's
    own copy (one copy made by one thread would be read by the others from its cache, line by
    line, every call; RESULTS item 127)."""
    if p16 == NULL:
        return p
    cynorm_widen_half(p16, room, D, kind)
    return room


cdef void _half_norm(const uint16_t* x, Py_ssize_t ldx, uint16_t* y, Py_ssize_t ldy,
                     Py_ssize_t M, Py_ssize_t D, const float* w, const float* b,
                     const uint16_t* w16, const uint16_t* b16, double* mean,
                     double* rstd, double eps, bint centred, const unsigned char* mask,
                     bint write_padding, const uint16_t* res, Py_ssize_t ldr, uint16_t* h,
                     Py_ssize_t ldh, float* scratch, Py_ssize_t per_thread, int kind,
                     int n_threads) noexcept nogil:
    # w16, b16: 16-bit parameters (else NULL: w, b float32 or NULL), widened by each thread
    # into its scratch after half_rows_scratch(D) floats
    cdef Py_ssize_t t, ahead = 0, nbytes = M * D * <Py_ssize_t>sizeof(uint16_t)
    cdef Py_ssize_t room = half_rows_scratch(D), Dp = (D + 15) // 16 * 16
    cdef float* ts
    cdef const float* wt
    cdef const float* bt
    cdef bint stream
    if res != NULL:
        nbytes *= 2   # h and y
    stream = streamed(nbytes, n_threads)
    if stream or nbytes >= PREFETCH_BYTES:
        ahead = (HALF_PREFETCH_AHEAD + 2 * D - 1) // (2 * D)   # rows, at least one
    if n_threads <= 1:
        wt = thread_param(w, w16, D, scratch + room, kind)
        bt = thread_param(b, b16, D, scratch + room + Dp, kind)
        half_norm_rows(x, ldx, y, ldy, 0, M, D, wt, bt, eps, centred, mean, rstd, mask,
                       write_padding, stream, ahead, res, ldr, h, ldh, scratch, kind)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        ts = scratch + t * per_thread
        wt = thread_param(w, w16, D, ts + room, kind)
        bt = thread_param(b, b16, D, ts + room + Dp, kind)
        half_norm_rows(x, ldx, y, ldy, chunk(M, t, n_threads), chunk(M, t + 1, n_threads), D,
                       wt, bt, eps, centred, mean, rstd, mask, write_padding, stream, ahead,
                       res, ldr, h, ldh, ts, kind)


cdef const void* half_param(cnp.ndarray a, Py_ssize_t D, int kind) except? NULL:
    """A parameter's data: float32, or 16-bit of the input's kind (widened by the caller)."""
    if a is not None and is_bits16(a):
        if cnp.PyArray_SIZE(a) != D or not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise ValueError(f"expected a contiguous array of {D} elements")
        if (cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT16 and kind != HALF_F16) or (
                cnp.PyArray_TYPE(a) >= NPY_USERDEF and kind != HALF_BF16):
            raise TypeError("16-bit parameters must have the input's dtype")
        return cnp.PyArray_DATA(a)
    return optional_data(a, D, 1)


cdef run_half_norm(cnp.ndarray x, cnp.ndarray y, Py_ssize_t D, cnp.ndarray weight,
                   cnp.ndarray bias, cnp.ndarray mean, cnp.ndarray rstd, double eps,
                   int n_threads, cnp.ndarray mask, bint write_padding, bint centred,
                   cnp.ndarray residual, cnp.ndarray h, int kind):
    """run_norm for 16-bit data: x, y (and residual, h) are 16-bit arrays (float16, bfloat16
    or uint16 views) holding float16 (kind HALF_F16) or bfloat16 (HALF_BF16) bits; weight and
    bias are float32, 16-bit of the same kind, or None."""
    cdef Py_ssize_t M = cnp.PyArray_SIZE(x) // D if D > 0 else 0
    cdef const unsigned char* mk = mask_data(mask, M)
    cdef Py_ssize_t ldx = row_stride(x, M, D, False), ldy = row_stride(y, M, D, True)
    cdef Py_ssize_t ldr = 0, ldh = 0, per_thread
    cdef const void* w = half_param(weight, D, kind)
    cdef const void* b = half_param(bias, D, kind)
    cdef const uint16_t* w16 = NULL
    cdef const uint16_t* b16 = NULL
    cdef double* mp = float64_data(mean, M)
    cdef double* rp = float64_data(rstd, M)
    cdef const uint16_t* rd = NULL
    cdef uint16_t* hd = NULL
    cdef float* scratch
    cdef int T = max(1, n_threads)
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if not is_bits16(x) or not is_bits16(y):
        raise TypeError("16-bit kernels take x and y as 16-bit float (or uint16) arrays")
    if (residual is None) != (h is None):
        raise ValueError("residual and h go together")
    if residual is not None:
        ldr = row_stride(residual, M, D, False)
        ldh = row_stride(h, M, D, True)
        if not is_bits16(residual) or not is_bits16(h):
            raise TypeError("16-bit kernels take residual and h as 16-bit float (or uint16) "
                            "arrays")
        rd = <const uint16_t*>cnp.PyArray_DATA(residual)
        hd = <uint16_t*>cnp.PyArray_DATA(h)
    if M == 0:
        return
    if w != NULL and is_bits16(weight):
        w16 = <const uint16_t*>w
        w = NULL
    if b != NULL and is_bits16(bias):
        b16 = <const uint16_t*>b
        b = NULL
    # per thread: half_rows_scratch(D) floats, then room for its copy of the 16-bit
    # parameters widened (whole lines of floats each)
    per_thread = half_rows_scratch(D) + (2 * ((D + 15) // 16 * 16) if w16 or b16 else 0)
    scratch = <float*>malloc(T * per_thread * sizeof(float))
    if scratch == NULL:
        raise MemoryError()
    try:
        with nogil:
            _half_norm(<const uint16_t*>cnp.PyArray_DATA(x), ldx,
                       <uint16_t*>cnp.PyArray_DATA(y), ldy, M, D, <const float*>w,
                       <const float*>b, w16, b16, mp, rp, eps, centred, mk, write_padding, rd,
                       ldr, hd, ldh, scratch, per_thread, kind, T)
    finally:
        free(scratch)


# the kinds as the front end passes them (layer_norm's and rms_norm's half=)
HALF_FLOAT16 = HALF_F16
HALF_BFLOAT16 = HALF_BF16


cdef void _convert(const void* src, void* dst, Py_ssize_t n, bint widen, int kind,
                   int n_threads) noexcept nogil:
    cdef Py_ssize_t t, a, e
    for t in prange(n_threads, num_threads=n_threads, schedule="static", chunksize=1):
        a = chunk(n, t, n_threads)
        e = chunk(n, t + 1, n_threads)
        if widen:
            cynorm_widen_half(<const uint16_t*>src + a, <float*>dst + a, e - a, kind)
        else:
            cynorm_narrow_half(<const float*>src + a, <uint16_t*>dst + a, e - a, kind)


def convert_half(cnp.ndarray src, cnp.ndarray dst, int kind, int n_threads):
    """dst = src converted between float32 and a 16-bit float (kind HALF_F16 or HALF_BF16), in
    the direction their dtypes say; C-contiguous arrays of one size.  Narrowing rounds to
    nearest even (NaN stays NaN, quiet), as NumPy's and ml_dtypes' casts do."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    cdef bint widen
    if kind != HALF_F16 and kind != HALF_BF16:
        raise ValueError(f"unknown 16-bit kind {kind}")
    if cnp.PyArray_SIZE(dst) != n or not cnp.PyArray_IS_C_CONTIGUOUS(src) \
            or not cnp.PyArray_IS_C_CONTIGUOUS(dst) or not cnp.PyArray_ISWRITEABLE(dst):
        raise ValueError("convert_half takes C-contiguous arrays of one size, dst writable")
    if is_bits16(src) and cnp.PyArray_TYPE(dst) == cnp.NPY_FLOAT32:
        widen = True
    elif cnp.PyArray_TYPE(src) == cnp.NPY_FLOAT32 and is_bits16(dst):
        widen = False
    else:
        raise TypeError("convert_half converts float32 to 16-bit floats or back")
    with nogil:
        _convert(cnp.PyArray_DATA(src), cnp.PyArray_DATA(dst), n, widen, kind,
                 max(1, n_threads))
