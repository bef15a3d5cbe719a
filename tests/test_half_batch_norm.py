"""16-bit BatchNorm forward (float16, bfloat16): its output from the kernels (core/halves.pxi's
affine_half) and its training statistics read from the 16-bit rows, every layout; each output
element within one unit in the last place of the correctly rounded float64 reference."""
import numpy as np
import pytest

import cynorm
from conftest import (HALVES, at_phase, bfloat16_or_skip, check_half, deep_cancelling_params,
                      half_data, half_dtype, half_params, mean_beside_150, ulps16)


def _bn_ref(x64, ax, mean, var, w=None, b=None, eps=1e-5):
    shape = [1] * x64.ndim
    shape[ax] = -1
    r = (x64 - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if w is not None:
        r = r * w.astype(np.float64).reshape(shape)
    if b is not None:
        r = r + b.astype(np.float64).reshape(shape)
    return r


# (N, C) and short L down the columns, long L by rows, feature-last, 4-D
BN_LAYOUTS = [((40, 24), 1), ((6, 5, 9), 1), ((6, 5, 70), 1), ((4, 9, 12), -1),
              ((3, 4, 8, 9), 1), ((2, 3, 2100), 1)]


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, axis", BN_LAYOUTS)
@pytest.mark.parametrize("params", ["none", "float32", "input"])
def test_batch_norm_within_one_ulp_of_the_reference(rng, name, shape, axis, params):
    """Training (batch statistics; the 16-bit running buffers updated) and then eval (those
    buffers), each output element within one ulp of the correctly rounded float64 result."""
    dt = half_dtype(name)
    x = half_data(rng, shape, dt)
    ax = axis % x.ndim
    C = shape[ax]
    w, b = half_params(rng, C, params, dt)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    rm, rv = np.zeros(C, dt), np.ones(C, dt)
    y, mean, invstd = cynorm.batch_norm(x, rm, rv, w, b, True, axis=axis, return_stats=True)
    check_half(y, _bn_ref(x64, ax, x64.mean(red), x64.var(red), w, b), dt)
    np.testing.assert_allclose(mean, x64.mean(red), rtol=1e-12)
    assert rm.dtype == rv.dtype == dt and not np.array_equal(rm, np.zeros(C, dt))
    ye = cynorm.batch_norm(x, rm, rv, w, b, False, axis=axis)
    check_half(ye, _bn_ref(x64, ax, rm.astype(np.float64), rv.astype(np.float64), w, b), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, axis", [((64, 40), 1), ((4, 6, 100), 1)])
def test_batch_norm_bias_cancelling_the_product(rng, name, shape, axis):
    """Eval outputs far smaller than their terms (the bias is minus the product for one
    sample): float64 arithmetic keeps them within one ulp."""
    dt = half_dtype(name)
    x = half_data(rng, shape, dt, offset_sigmas=50)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(np.float32) + 150
    rv = rng.uniform(1, 4, C).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x64 = x.astype(np.float64)
    first = x64[0].reshape(C, -1)[:, 0]   # sample 0's first element of each feature
    b = (-(first - rm) / np.sqrt(rv.astype(np.float64) + 1e-5) * w).astype(np.float32)
    ref = _bn_ref(x64, axis, rm.astype(np.float64), rv.astype(np.float64), w, b)
    assert np.median(np.abs(ref[0].reshape(C, -1)[:, 0])) < 1e-4 * np.median(np.abs(b))
    check_half(cynorm.batch_norm(x, rm, rv, w, b, False, axis=axis), ref, dt)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_norm_training_cancelling_bias_next_to_a_mean_far_from_the_first_element(
        rng, threads):
    """Training-mode BatchNorm of (N, C, L) with long L (the features by rows, merged over
    the batch) on rows whose mean (150 + 1/L) lies 50 from each feature's first element, each
    feature's bias minus the product at one element equal to 150: those outputs, far smaller
    than their terms, need the mean to far finer than one float64 (feature_moments' rest).
    Against exact arithmetic (as test_half_precision.py's LayerNorm case)."""
    dt = bfloat16_or_skip()
    N, C, L = 3, 16, 2000
    x = mean_beside_150(rng, (N, C, L)).astype(dt)
    x64 = x.astype(np.float64)
    units = [x64[:, c].reshape(-1) for c in range(C)]   # feature c's N·L elements
    at = [int(np.nonzero(x64[1, c] == 150)[0][0]) + L for c in range(C)]   # in sample 1
    w, b, want = deep_cancelling_params(rng, units, at)
    with cynorm.num_threads(threads):
        y = cynorm.batch_norm(x, None, None, w, b, True)
    got = np.array([y[1, c, at[c] - L] for c in range(C)], dt)
    check_half(got, want, dt, 2.0 ** -49 * np.abs(b))   # 2^-50 of the terms


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_out_in_place_threads_and_every_kernels_build(rng, name):
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = half_data(rng, (300, 7, 40), dt, offset_sigmas=30)
    w = rng.uniform(0.5, 2.0, 7).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    rm = rng.standard_normal(7).astype(np.float32) + 90
    rv = rng.uniform(1, 4, 7).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = _bn_ref(x64, 1, rm.astype(np.float64), rv.astype(np.float64), w, b)
    with cynorm.num_threads(1):
        y1 = cynorm.batch_norm(x, rm, rv, w, b, False)
    with cynorm.num_threads(2):
        y2 = cynorm.batch_norm(x, rm, rv, w, b, False)
    check_half(y1, ref, dt)
    assert y1.tobytes() == y2.tobytes()   # the same bits on any thread count
    out = at_phase(np.empty_like(x), 6)
    assert cynorm.batch_norm(x, rm, rv, w, b, False, out=out) is out
    assert out.tobytes() == y1.tobytes()
    xc = x.copy()
    assert cynorm.batch_norm(xc, rm, rv, w, b, False, out=xc) is xc
    assert xc.tobytes() == y1.tobytes()
    stats = np.stack([rm.astype(np.float64), np.zeros(7), rv.astype(np.float64)])
    for level in _isa.available():   # each kernels module: by rows, and down the columns
        for rows, cols, by_rows in ((300 * 7, 40, True), (300, 7 * 40, False)):
            y = np.empty_like(x)
            _isa.load(level).affine_half(x.reshape(rows, cols), y.reshape(rows, cols), rows,
                                         cols, by_rows, stats, 1.0, w, b, 1e-5, half_kind(dt),
                                         2)
            check_half(y, ref, dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("rows, C", [(40, 4128), (8, 16400), (1100, 1100)])
def test_batch_norm_eval_few_rows_of_many_features(rng, name, rows, C):
    """Eval with no more rows than features (the threads split the features: each makes its
    columns' parameters): within one ulp, the bits of one thread, with a mask and with out=."""
    dt = half_dtype(name)
    x = half_data(rng, (rows, C), dt, offset_sigmas=30)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm = rng.standard_normal(C).astype(np.float32) + 90
    rv = rng.uniform(1, 4, C).astype(np.float32)
    rv[3], rm[5] = 0.0, np.nan   # no defined output there: NaN columns, as torch gives
    x64 = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = _bn_ref(x64, 1, rm.astype(np.float64), rv.astype(np.float64), w, b, eps=0.0)
    with cynorm.num_threads(1):
        y1 = cynorm.batch_norm(x, rm, rv, w, b, False, eps=0.0)
    with cynorm.num_threads(2):
        y2 = cynorm.batch_norm(x, rm, rv, w, b, False, eps=0.0)
        out = at_phase(np.empty_like(x), 2)
        assert cynorm.batch_norm(x, rm, rv, w, b, False, eps=0.0, out=out) is out
        keep = rng.random(rows) < 0.7
        ym = cynorm.batch_norm(x[None], rm, rv, w, b, False, eps=0.0, axis=-1,
                               mask=keep[None])[0]
    assert np.isnan(y1[:, [3, 5]].astype(np.float64)).all()
    good = np.ones(C, bool)
    good[[3, 5]] = False
    check_half(y1[:, good], ref[:, good], dt)
    assert y1.tobytes() == y2.tobytes() == out.tobytes()
    assert ym[keep].tobytes() == y1[keep].tobytes()
    assert not ym[~keep].astype(np.float64).any()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("rows, C", [(200, 37), (64, 520), (40, 1048), (3, 9)])
def test_batch_norm_eval_element_values_do_not_depend_on_their_place(rng, name, rows, C):
    """Eval down the columns: narrow rows go sixteen columns at a time down blocks of rows,
    wider ones along the row, a row's last few columns under a mask.  Each element is the
    same bits whatever way it is reached: the whole array on one or two threads, one row at a
    time, or the columns from 16 on (their sixteens then start elsewhere); within one ulp,
    with biases cancelling the product in the first row, the masked last columns included."""
    dt = half_dtype(name)
    x = half_data(rng, (rows, C), dt, offset_sigmas=40)
    rm = rng.standard_normal(C).astype(np.float32) + 120
    rv = rng.uniform(1, 4, C).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x64 = x.astype(np.float64)
    b = (-(x64[0] - rm) / np.sqrt(rv.astype(np.float64) + 1e-5) * w).astype(np.float32)
    ref = _bn_ref(x64, 1, rm.astype(np.float64), rv.astype(np.float64), w, b)
    assert np.median(np.abs(ref[0])) < 1e-4 * np.median(np.abs(b))
    with cynorm.num_threads(1):
        y1 = cynorm.batch_norm(x, rm, rv, w, b, False)
        by_row = np.concatenate([cynorm.batch_norm(x[i:i + 1], rm, rv, w, b, False)
                                 for i in range(rows)])
    with cynorm.num_threads(2):
        y2 = cynorm.batch_norm(x, rm, rv, w, b, False)
    check_half(y1, ref, dt)
    assert y1.tobytes() == y2.tobytes() == by_row.tobytes()
    if C > 16:
        part = cynorm.batch_norm(np.ascontiguousarray(x[:, 16:]), rm[16:], rv[16:], w[16:],
                                 b[16:], False)
        assert part.tobytes() == np.ascontiguousarray(y1[:, 16:]).tobytes()


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_masked_feature_last(rng, name):
    """(N, T, C) with lengths: the statistics of the real tokens, padding written as 0, the
    real tokens as BatchNorm of those tokens alone."""
    dt = half_dtype(name)
    x = half_data(rng, (5, 11, 24), dt, offset_sigmas=100)
    lengths = np.array([11, 3, 0, 7, 1])
    real = np.concatenate([x[n, :k] for n, k in enumerate(lengths)])
    rm, rv = np.zeros(24, np.float32), np.ones(24, np.float32)
    y = cynorm.batch_norm(x, rm, rv, training=True, axis=-1, lengths=lengths)
    want = cynorm.batch_norm(real, np.zeros(24, np.float32), np.ones(24, np.float32),
                             training=True)
    got = np.concatenate([y[n, :k] for n, k in enumerate(lengths)])
    r64 = real.astype(np.float64)
    check_half(got, _bn_ref(r64, 1, r64.mean(0), r64.var(0)), dt)
    assert np.abs(ulps16(got, want)).max() <= 1
    pad = np.concatenate([y[n, k:] for n, k in enumerate(lengths)])
    assert pad.size and not pad.astype(np.float32).any()
    ye = cynorm.batch_norm(x, rm, rv, training=False, axis=-1, lengths=lengths)
    pad = np.concatenate([ye[n, k:] for n, k in enumerate(lengths)])
    assert not pad.astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_nan_inf_and_huge(rng, name):
    dt = half_dtype(name)
    big = 6.0e4 if name == "float16" else 1e37
    x = (big + big * 1e-2 * rng.standard_normal((64, 8))).astype(dt)
    y = cynorm.batch_norm(x, training=True)
    assert np.isfinite(y.astype(np.float32)).all()   # a finite result from huge inputs
    x64 = x.astype(np.float64)
    check_half(y, _bn_ref(x64, 1, x64.mean(0), x64.var(0)), dt)
    x = half_data(rng, (16, 4), dt, offset_sigmas=3)
    x[3, 1] = np.nan
    x[5, 2] = np.inf
    y = cynorm.batch_norm(x, training=True)
    yf = y.astype(np.float32)
    assert np.isnan(yf[:, 1]).all() and np.isnan(yf[:, 2]).all()
    assert np.isfinite(yf[:, [0, 3]]).all()
    ye = cynorm.batch_norm(x, np.zeros(4, np.float32), np.ones(4, np.float32), training=False)
    yef = ye.astype(np.float32)
    assert np.isnan(yef[3, 1]) and np.isinf(yef[5, 2])
    assert np.isfinite(np.delete(yef.ravel(), [3 * 4 + 1, 5 * 4 + 2])).all()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape", [(9, 6), (3, 6, 70)])
def test_batch_norm_element_equal_to_the_mean_gives_zero(rng, name, shape):
    """A feature whose mean is one of its elements: there the output is exactly 0 (bfloat16
    keeps values down to 1e-38, so the statistics' last bits must not show)."""
    dt = half_dtype(name)
    x = half_data(rng, shape, dt, offset_sigmas=300)
    x3 = x.reshape(shape[0], shape[1], -1)
    x3[:, 2] = 512.0   # feature 2: 512 but for 516 and 508 (exact in both dtypes)
    x3[1, 2, 0] = 516.0
    x3[2, 2, 0] = 508.0
    assert x3[:, 2].astype(np.float64).mean() == 512.0
    y = cynorm.batch_norm(x, training=True).reshape(x3.shape)
    assert float(y[0, 2, 0]) == 0.0 and not y[3:, 2].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_statistics_down_the_columns(rng, name):
    """(N, C) and feature-last input: the training statistics from the 16-bit rows, widened a
    block at a time in the kernels, as those of a float32 copy; the same bits on any thread
    count and within one ulp, masked too; every kernels module."""
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = half_data(rng, (3000, 40), dt)
    x64 = x.astype(np.float64)
    outs = []
    for threads in (1, 2):
        with cynorm.num_threads(threads):
            outs.append(cynorm.batch_norm(x, training=True, return_stats=True))
    y, mean, invstd = outs[0]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(outs[0], outs[1]))
    check_half(y, _bn_ref(x64, 1, x64.mean(0), x64.var(0)), dt)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(x64.var(0) + 1e-5), rtol=1e-6)
    for level in _isa.available():
        st16, st32 = np.empty((3, 40)), np.empty((3, 40))
        mod = _isa.load(level)
        n16 = mod.feature_moments(x, 3000, 40, 40, False, st16, 2, 100, None, True,
                                  half_kind(dt))
        n32 = mod.feature_moments(x.astype(np.float32), 3000, 40, 40, False, st32, 2, 100,
                                  None, True)
        assert n16 == n32 == 3000
        np.testing.assert_allclose(st16[0] + st16[1], st32[0] + st32[1], rtol=1e-13)
        np.testing.assert_allclose(st16[2], st32[2], rtol=1e-6)
    xz = (rng.standard_normal((5000, 24))).astype(np.float32).astype(dt)   # around zero
    _, mean, _ = cynorm.batch_norm(xz, training=True, return_stats=True)
    xz64 = xz.astype(np.float64)
    # float64's precision, where float32 sums (some 1e-9 of the std) would break the ulp
    # bound of outputs next to the mean
    np.testing.assert_allclose(mean, xz64.mean(0), rtol=0, atol=1e-13 * xz64.std(0).min())
    xm = half_data(rng, (30, 100, 12), dt, offset_sigmas=200)
    lengths = rng.integers(0, 101, 30)
    lengths[3] = 100
    real = np.concatenate([xm[n, :k] for n, k in enumerate(lengths)]).astype(np.float64)
    with cynorm.num_threads(2):
        ym = cynorm.batch_norm(xm, training=True, axis=-1, lengths=lengths)
    got = np.concatenate([ym[n, :k] for n, k in enumerate(lengths)])
    check_half(got, _bn_ref(real, 1, real.mean(0), real.var(0)), dt)


@pytest.mark.parametrize("name", HALVES)
def test_statistics_by_rows_are_the_float32_copys_bits(rng, name):
    """By rows ((N, C, L) with long L) each 16-bit row is summed widened in registers, block
    by block (core/halves.h's instantiation of the shifted sums): the moments of the float32
    copy's rows, to the bit, in every kernels module; and GroupNorm's channels-first
    statistics, from a unit's elements as one row, those of the float32 copy too."""
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    for L in (1, 7, 2048, 2056, 2952, 5000):
        x = half_data(rng, (6, 4, L), dt, offset_sigmas=20)
        for level in _isa.available():
            mod = _isa.load(level)
            s16, s32 = np.empty((3, 4)), np.empty((3, 4))
            mod.feature_moments(x, 24, L, 4, True, s16, 2, 64, None, False, half_kind(dt))
            mod.feature_moments(x.astype(np.float32), 24, L, 4, True, s32, 2, 64, None, False)
            assert s16.tobytes() == s32.tobytes()
        if L > 1:
            _, m16, r16 = cynorm.group_norm(x, 2, return_stats=True)
            _, m32, r32 = cynorm.group_norm(x.astype(np.float32), 2, return_stats=True)
            assert m16.tobytes() == m32.tobytes() and r16.tobytes() == r32.tobytes()


def _nearest_half(d, dt):
    """The float64 array d correctly rounded to dt, ties to even, by search in the table of
    every non-negative 16-bit value (the differences to the two around |d| are exact in
    float64); inf at and beyond the half-way point past the largest finite value."""
    top = 0x7C00 if dt == np.float16 else 0x7F80          # the bits of inf
    bits = np.arange(top + 1, dtype=np.uint16)
    vals = bits[:-1].view(dt).astype(np.float64)
    vals = np.append(vals, 2 * vals[-1] - vals[-2])        # inf's place: one step past the top
    a = np.abs(d)
    i = np.clip(np.searchsorted(vals, a), 1, len(vals) - 1)
    lo, hi = vals[i - 1], vals[i]
    below, above = a - lo, hi - a
    pick = np.where((above < below) | ((above == below) & (bits[i] % 2 == 0)), i, i - 1)
    pick = np.where(a == 0, 0, np.where(a > vals[-1], len(vals) - 1, pick))
    return (bits[pick] | np.where(np.signbit(d), 0x8000, 0).astype(np.uint16)).view(dt)


@pytest.mark.parametrize("name", HALVES)
def test_16_bit_running_buffers_rounded_once(rng, name):
    """The kernel's update of 16-bit running buffers: the float64 value rounded once to the
    nearest 16-bit value, ties to even, also a float32 ulp or less beside a tie (where rounding
    to float32 first would land on the tie and round the wrong way), and inf beyond the top."""
    from cynorm import _isa
    from cynorm._validation import half_kind
    dt = half_dtype(name)
    C = 400
    h = half_data(rng, C, dt, offset_sigmas=rng.choice([0.0, 30.0]))
    up = np.nextafter(h, np.array(np.inf, dt))
    mid = (h.astype(np.float64) + up.astype(np.float64)) / 2   # half-way to the next value
    tiny = np.abs(mid) * 2.0 ** -30 * rng.choice([-1.0, 0.0, 1.0], C)
    stats = np.zeros((3, C))
    stats[0] = mid                    # the mean: hi ...
    stats[1] = tiny                   # ... + lo, a fraction of a float32 ulp beside the tie
    stats[2] = rng.uniform(0, 7e4 if name == "float16" else 1e30, C)
    stats[2, :3] = (1e300, 65520.0, 65519.0)
    rm, rv = rng.standard_normal(C).astype(dt), rng.standard_normal(C).astype(dt)
    _isa.kernels.update_running(rm, rv, stats, 2.0, 1.0, half_kind(dt))   # momentum 1
    np.testing.assert_array_equal(rm.view(np.uint16), _nearest_half(mid + tiny, dt).view(np.uint16))
    np.testing.assert_array_equal(rv.view(np.uint16), _nearest_half(stats[2], dt).view(np.uint16))
    # through the public call, momentum 0.1: the float64 expression rounded once
    x = half_data(rng, (50, 7), dt, offset_sigmas=20.0)
    rm = half_data(rng, 7, dt, offset_sigmas=20.0)
    rv = (np.abs(half_data(rng, 7, dt, offset_sigmas=0.0)) + 1).astype(dt)
    old_m, old_v = rm.astype(np.float64), rv.astype(np.float64)
    _, mean, _ = cynorm.batch_norm(x, rm, rv, None, None, True, return_stats=True)
    var = x.astype(np.float64).var(axis=0, ddof=1)
    for got, want in ((rm, 0.9 * old_m + 0.1 * mean), (rv, 0.9 * old_v + 0.1 * var)):
        assert (ulps16(got, _nearest_half(want, dt)) <= 1).all()
