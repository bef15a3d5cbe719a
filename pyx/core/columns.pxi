# Core: the column driver, the moments of the features of an (N, F) block read down its
# columns (BatchNorm on (N, C), feature-last (N, T, C) and short-L (N, C, L) input).
#
# Rows are gathered a block at a time (a mask skips padding rows), the first block's moments
# give each column its shift, later blocks add centred sums of four rows per sweep (float64,
# core/sums.h) and are merged by Chan's formula.  For float32 input in BatchNorm's forward
# pass (``fast``) the blocks after the first sum scaled deviations in float32 groups of 16
# rows: M2 good to about 1e-7 relative, enough for a float32 output.

cdef extern from "core/sums.h" nogil:
    # column moments: centred sums of four rows / one row (see column_block_centered)
    void cynorm_centered4_f(const float* r0, const float* r1, const float* r2, const float* r3,
                            const double* shift, double* c, double* q, Py_ssize_t fb,
                            Py_ssize_t fe) noexcept
    void cynorm_centered4_d(const double* r0, const double* r1, const double* r2,
                            const double* r3, const double* shift, double* c, double* q,
                            Py_ssize_t fb, Py_ssize_t fe) noexcept
    void cynorm_centered1_f(const float* r0, const double* shift, double* c, double* q,
                            Py_ssize_t F) noexcept
    void cynorm_centered1_d(const double* r0, const double* shift, double* c, double* q,
                            Py_ssize_t F) noexcept
    # BatchNorm's float32 column moments: scaled deviations summed in float32 (column_chunk_moments)
    void cynorm_scaled16_f(const float** rows, const float* s, const float* k, double* c,
                           double* q, Py_ssize_t F) noexcept
    void cynorm_scaled1_f(const float* r0, const float* s, const float* k, double* c,
                          double* q, Py_ssize_t F) noexcept
    float cynorm_unit_scale(double y) noexcept

cdef extern from "core/halves_sums.h" nogil:
    # column_block_centered's four rows read from 16-bit rows, widened in registers
    void cynorm_centered_half(const uint16_t* const* rows, Py_ssize_t nr, const double* shift,
                              double* c, double* q, Py_ssize_t F, int kind,
                              float* scratch) noexcept

cdef inline Py_ssize_t gather_rows(const floating* x, Py_ssize_t ld, Py_ssize_t rb,
                                   Py_ssize_t re, const unsigned char* mask,
                                   const floating** rows) noexcept nogil:
    """Pointers to the rows rb..re of x that the mask keeps (all without a mask); their count.

    Padding rows are skipped where they lie: nothing is copied."""
    cdef Py_ssize_t r, k = 0
    for r in range(rb, re):
        if mask == NULL or mask[r]:
            rows[k] = x + r * ld
            k += 1
    return k


cdef inline Py_ssize_t gather_rows16(const uint16_t* x, Py_ssize_t ld, Py_ssize_t rb,
                                     Py_ssize_t re, const unsigned char* mask,
                                     const uint16_t** rows) noexcept nogil:
    """gather_rows of 16-bit rows, left unwidened."""
    cdef Py_ssize_t r, k = 0
    for r in range(rb, re):
        if mask == NULL or mask[r]:
            rows[k] = x + r * ld
            k += 1
    return k


cdef Py_ssize_t gather_half_rows(const uint16_t* x, Py_ssize_t ld, Py_ssize_t rb,
                                 Py_ssize_t re, const unsigned char* mask, const float** rows,
                                 float* wide, Py_ssize_t F, int kind) noexcept nogil:
    """gather_rows of 16-bit rows (kind: core/halves.pxi's): each kept row widened into the
    next F floats of wide, its pointer into rows; their count."""
    cdef Py_ssize_t r, k = 0
    for r in range(rb, re):
        if mask == NULL or mask[r]:
            cynorm_widen_half(x + r * ld, wide + k * F, F, kind)
            rows[k] = wide + k * F
            k += 1
    return k


cdef void column_block_sums(const floating** rows, Py_ssize_t nr, Py_ssize_t F,
                            double* s) noexcept nogil:
    """s[f] += sum of rows[r][f] over the nr rows."""
    cdef Py_ssize_t r = 0, f
    cdef const floating* r0
    cdef const floating* r1
    cdef const floating* r2
    cdef const floating* r3
    # Four rows per sweep of the feature axis: a quarter of the loads and stores of s.
    while r + 4 <= nr:
        r0 = rows[r]
        r1 = rows[r + 1]
        r2 = rows[r + 2]
        r3 = rows[r + 3]
        for f in range(F):
            s[f] += (<double>r0[f] + <double>r1[f]) + (<double>r2[f] + <double>r3[f])
        r += 4
    while r < nr:
        r0 = rows[r]
        for f in range(F):
            s[f] += r0[f]
        r += 1


cdef inline void centered4(const floating* r0, const floating* r1, const floating* r2,
                           const floating* r3, const double* shift, double* c, double* q,
                           Py_ssize_t fb, Py_ssize_t fe) noexcept nogil:
    """Columns fb..fe of four rows into c and q (see column_block_centered; core/sums.h)."""
    if floating is float:
        cynorm_centered4_f(r0, r1, r2, r3, shift, c, q, fb, fe)
    else:
        cynorm_centered4_d(r0, r1, r2, r3, shift, c, q, fb, fe)


cdef void column_block_centered(const floating** rows, Py_ssize_t nr, Py_ssize_t F,
                                const double* shift, double* c, double* q) noexcept nogil:
    """c[f] += Σ (rows[r][f] - shift[f]) and q[f] += Σ (rows[r][f] - shift[f])²."""
    cdef Py_ssize_t r = 0, fb, fe
    cdef Py_ssize_t line = 64 // sizeof(floating)
    while r + 4 <= nr:
        if floating is double and r + 8 <= nr:
            # float64 rows: a cache line of each of the four rows at a time, asking for the
            # same line of the next four (short row streams restarting every four rows are
            # too short for the hardware prefetcher).  float32 rows measured slower with it, so
            # they do not (benchmarks/RESULTS.md, item 27).
            fb = 0
            while fb < F:
                fe = fb + line if fb + line < F else F
                cynorm_prefetch(rows[r + 4] + fb)
                cynorm_prefetch(rows[r + 5] + fb)
                cynorm_prefetch(rows[r + 6] + fb)
                cynorm_prefetch(rows[r + 7] + fb)
                centered4(rows[r], rows[r + 1], rows[r + 2], rows[r + 3], shift, c, q, fb, fe)
                fb = fe
        else:
            centered4(rows[r], rows[r + 1], rows[r + 2], rows[r + 3], shift, c, q, 0, F)
        r += 4
    while r < nr:
        if floating is float:
            cynorm_centered1_f(rows[r], shift, c, q, F)
        else:
            cynorm_centered1_d(rows[r], shift, c, q, F)
        r += 1


cdef void column_block_scaled(const float** rows, Py_ssize_t nr, Py_ssize_t F, const float* s,
                              const float* k, double* c, double* q) noexcept nogil:
    """c[f] += Σ d and q[f] += Σ d² with d = (rows[r][f] - s[f]) * k[f] in float32 (core/sums.h)."""
    cdef Py_ssize_t r = 0
    while r + 16 <= nr:
        cynorm_scaled16_f(rows + r, s, k, c, q, F)
        r += 16
    while r < nr:
        cynorm_scaled1_f(rows[r], s, k, c, q, F)
        r += 1


cdef void column_block_centered_half(const uint16_t** rows, Py_ssize_t nr, Py_ssize_t F,
                                     const double* shift, double* c, double* q, int kind,
                                     float* wide) noexcept nogil:
    """column_block_centered of 16-bit rows (kind: core/halves.pxi's), four at a time widened
    in registers (core/halves_sums.h), the rest one at a time through wide (at least 4·F floats)."""
    cdef Py_ssize_t r = nr - nr % 4
    cynorm_centered_half(rows, r, shift, c, q, F, kind, wide)
    while r < nr:
        cynorm_widen_half(rows[r], wide, F, kind)
        cynorm_centered1_f(wide, shift, c, q, F)
        r += 1


cdef bint scales_from_first_block(const double* hi, const double* m2, double nb, Py_ssize_t F,
                                  float* k) noexcept nogil:
    """The power of two k[f] bringing column f's deviations near 1, from its first block: its
    standard deviation times k in [1, 2), or, for a constant first block, its value times k in
    [1, 2).  False when some column has no scale (a first block of zeros, a non-finite value,
    or a scale beyond 2^±120): the chunk then keeps the float64 sweep.

    Why float32 squares then lose nothing that matters: a scaled square lost to underflow is
    below 2^-126.  With the first block's standard deviation, M2 * k^2 is at least that block's
    row count; with a constant first block, any other float32 value lies at least 2^-24 of it
    away, so a scaled deviation of a value other than it is at least 2^-25.  Either way the
    loss is some 2^-76 of M2 or less.  Squares too large for float32 give inf, and the chunk is
    redone in float64."""
    cdef Py_ssize_t f
    cdef double v
    for f in range(F):
        v = m2[f] / nb
        if v > 0.0:
            k[f] = cynorm_unit_scale(sqrt(v))
        else:
            k[f] = cynorm_unit_scale(fabs(hi[f]))
        if k[f] == 0.0:   # also for inf / NaN (v > 0 is False for NaN: hi is NaN then)
            return False
    return True


cdef inline void merge_block(Py_ssize_t F, double nb, double na, const double* c,
                             const double* q, const double* hi, double* lo, double* m2,
                             const float* s, const float* k) noexcept nogil:
    """Chan's merge of a block of nb rows, its centred sums c = Σ(x - hi) and q = Σ(x - hi)²,
    into the na rows before it (mean hi + lo, M2 m2).  With s (the float32 sweep) c and q are
    sums of (x - s)·k: 1 / k scales them back and s - hi (exact) moves the block's mean onto
    hi."""
    cdef Py_ssize_t f
    cdef double n = na + nb, inv_nb = 1.0 / nb, wb, wa, rel, m2b, delta, ik
    wb = nb / n
    wa = na * wb
    for f in range(F):
        rel = c[f] * inv_nb
        m2b = q[f] - c[f] * rel
        if s != NULL:
            ik = 1.0 / <double>k[f]
            m2b = m2b * ik * ik
            rel = rel * ik + (<double>s[f] - hi[f])
        m2b = m2b if not m2b < 0.0 else 0.0
        delta = rel - lo[f]
        lo[f] += delta * wb
        m2[f] += m2b + delta * delta * wa


cdef void column_chunk_moments(const floating* x, Py_ssize_t ld, Py_ssize_t first,
                               Py_ssize_t last, Py_ssize_t F, Py_ssize_t rows_per_block,
                               const unsigned char* mask, double* count, double* hi, double* lo,
                               double* m2, double* c, double* q, float* sk,
                               const uint16_t* x16=NULL, int kind=-1,
                               float* wide=NULL) noexcept nogil:
    """Per-column moments of rows first..last of a row-major (rows, F) array, row stride ld,
    over the rows the mask keeps (every row without a mask).

    Rows are taken in blocks that stay in cache.  The first non-empty block gets a corrected
    two-pass: its means become the shifts hi.  Every later block is one pass of sums of x - hi
    and (x - hi)², merged into lo and M2 by Chan's formula.  With hi the mean of a block of the
    same data, the rounding of Σ(x - hi)² stays a few float64 ulps of the total M2.

    sk (float32 rows only; NULL for the float64 sweep): scratch of 2 * F floats.  The first
    block is then FIRST_BLOCK_ROWS rows, and the blocks after it take the float32 sweep
    (column_block_scaled, SCALED_BLOCK_ROWS rows a block): deviations from s, the running mean
    rounded to float32 (s - hi, exact in float64, moves each block's mean back onto hi),
    scaled by powers of two k from the first block so that their squares stay far from
    float32's over- and underflow; Chan's merge stays in float64.  Each group of 16 rows
    rounds Σ(x - s)² to a few float32 ulps, so M2 is good to about 1e-7 relative (a few 1e-7
    when the batch changes regime part-way, Σ(x - s)² then being a few times M2): enough for
    BatchNorm's float32 output, where the float64 sweep gives float64 ulps.  A chunk whose
    scaled sums overflowed (or met inf / NaN) is redone with the float64 sweep; one whose first
    block gives no scale keeps the float64 sweep (rows_per_block rows a block).

    x16 (float32 x only, x then unused): 16-bit rows of that kind: the moments of a float32
    copy's rows, without the copy.  The float64 sweep's first block is then FIRST_BLOCK_ROWS
    rows, widened into wide as they are gathered; the blocks after it are widened in registers
    as they are summed (column_block_centered_half).  sk must then be NULL (16-bit columns
    take the float64 sweep: ops/moments.pxi's feature_moments says why), and rows_per_block
    at least FIRST_BLOCK_ROWS; wide holds rows_per_block rows of F floats.
    """
    cdef const floating* rows[MAX_BLOCK_ROWS]
    cdef const uint16_t* rows16[MAX_BLOCK_ROWS]
    cdef Py_ssize_t rb = first, re, f, nr
    cdef double nb, inv_nb
    cdef bint scaled = False, redo = False
    cdef float* s = sk
    cdef float* k = sk + F if sk != NULL else NULL
    count[0] = 0.0
    for f in range(F):
        hi[f] = 0.0
        lo[f] = 0.0
        m2[f] = 0.0
    if rows_per_block > MAX_BLOCK_ROWS:
        rows_per_block = MAX_BLOCK_ROWS
    while rb < last:
        if sk == NULL or (count[0] > 0 and not scaled):
            re = rb + rows_per_block
            if x16 != NULL and count[0] == 0 and rows_per_block > FIRST_BLOCK_ROWS:
                re = rb + FIRST_BLOCK_ROWS   # the 16-bit rows' first block, widened
        else:
            re = rb + (SCALED_BLOCK_ROWS if scaled else FIRST_BLOCK_ROWS)
        re = re if re < last else last
        if floating is float:
            if x16 != NULL and count[0] > 0:   # widened as they are summed
                nr = gather_rows16(x16, ld, rb, re, mask, rows16)
            elif x16 != NULL:
                nr = gather_half_rows(x16, ld, rb, re, mask, rows, wide, F, kind)
            else:
                nr = gather_rows(x, ld, rb, re, mask, rows)
        else:
            nr = gather_rows(x, ld, rb, re, mask, rows)
        rb = re
        if nr == 0:
            continue
        nb = <double>nr
        inv_nb = 1.0 / nb
        for f in range(F):
            c[f] = 0.0
            q[f] = 0.0
        if scaled:
            if floating is float:
                for f in range(F):
                    s[f] = <float>(hi[f] + lo[f])
                column_block_scaled(rows, nr, F, s, k, c, q)
        else:
            if count[0] == 0:
                column_block_sums(rows, nr, F, hi)
                for f in range(F):
                    hi[f] *= inv_nb
                column_block_centered(rows, nr, F, hi, c, q)
            elif floating is float and x16 != NULL:
                column_block_centered_half(rows16, nr, F, hi, c, q, kind, wide)
            else:
                column_block_centered(rows, nr, F, hi, c, q)
        merge_block(F, nb, count[0], c, q, hi, lo, m2, s if scaled else NULL, k)
        count[0] += nb
        if floating is float:
            if sk != NULL and count[0] == nb:
                scaled = scales_from_first_block(hi, m2, nb, F, k)
    if floating is float:
        if scaled:
            for f in range(F):
                if not (isfinite(m2[f]) and isfinite(lo[f])):
                    redo = True
                    break
            if redo:   # float32 overflow, or inf / NaN in x: the float64 sweep's results
                column_chunk_moments(x, ld, first, last, F, rows_per_block, mask, count, hi,
                                     lo, m2, c, q, NULL, x16, kind, wide)
