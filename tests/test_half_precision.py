"""16-bit floats (float16, bfloat16): read and written by the kernels of the row norms
(LayerNorm, RMSNorm and their residual forms) and by cynorm.moments; the conversions, the dtype
policy and torch's half tensors.  Each output element is within one unit in the last place of
the correctly rounded float64 reference computed from the same 16-bit input.  BatchNorm's and
the group norms' forward: test_half_batch_norm.py, test_half_group_norm.py; every backward:
test_half_backward.py."""
import numpy as np
import pytest

import cynorm
from conftest import (HALVES, at_phase, bfloat16_or_skip, check_half, exact_norm, half_data,
                      half_dtype, half_params, mean_beside_150, reference_norm, reference_rms,
                      same_gradients_as_torch)


def _ref(op, x, D, w=None, b=None, eps=None):
    x64 = x.astype(np.float64)
    w64 = None if w is None else w.astype(np.float64)
    if op == "layer_norm":
        b64 = None if b is None else b.astype(np.float64)
        return reference_norm(x64, (-1,), w64, b64, 1e-5 if eps is None else eps, (D,))
    return reference_rms(x64, D, w64, eps)[0]


def _call(op, x, D, w, b, **kw):
    if op == "layer_norm":
        return cynorm.layer_norm(x, D, w, b, **kw)
    return cynorm.rms_norm(x, D, w, **kw)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("D", [1, 7, 64, 300, 4099])
@pytest.mark.parametrize("params", ["none", "float32", "input"])
def test_within_one_ulp_of_the_reference(rng, name, op, D, params):
    dt = half_dtype(name)
    x = half_data(rng, (37, D), dt)
    w, b = half_params(rng, D, params, dt)
    y = _call(op, x, D, w, b)
    check_half(y, _ref(op, x, D, w, b), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("D", [16, 203, 4096])
def test_bias_cancelling_the_product(rng, name, D):
    """Outputs far smaller than their terms: b chosen as minus the product (to float32), so
    that most outputs are the product's last bits; the kernels' float32 terms alone would be
    several 16-bit ulps off there (core/halves.h computes such blocks again in float64).  An
    output that b cancels to below some 2^-44 of the product is beyond what float64 fixes to
    a 16-bit ulp (check_half's slack: 2^-50 of the terms, the reference's rounding errors and
    the kernel's)."""
    dt = half_dtype(name)
    x = half_data(rng, (24, D), dt, offset_sigmas=50)
    w = rng.uniform(0.5, 2.0, D).astype(np.float32)
    x64 = x.astype(np.float64)
    z = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    b = (-(z[7] * w)).astype(np.float32)   # row 7 cancels almost everywhere, others partly
    ref = _ref("layer_norm", x, D, w, b)
    assert np.median(np.abs(ref[7])) < 1e-5 * np.median(np.abs(b))
    slack = 2.0 ** -50 * (np.abs(z * w) + np.abs(b))
    check_half(cynorm.layer_norm(x, D, w, b), ref, dt, slack)
    out = at_phase(np.empty_like(x), 2)
    check_half(cynorm.layer_norm(x, D, w, b, out=out), ref, dt, slack)


@pytest.mark.parametrize("first", [100, 20])
@pytest.mark.parametrize("D", [2000, 5000])
def test_cancelling_bias_next_to_a_mean_far_from_the_first_element(rng, D, first):
    """Elements next to the mean (150 + 1/D) whose bias cancels most of the product, in rows
    whose first element (100, or 20: the first block summed again about its mean) lies far
    from the mean, one block and several: the float64 redo needs the mean to far finer than
    2^-53 of its distance from x[0] (row_moments_half's sums, moved exactly to the new shift),
    or these outputs move by several ulps.  Against exact arithmetic; the residual form (a
    zero residual) reads its statistics from h and must give the same bits.  bfloat16 only:
    float16 cannot hold outputs this small."""
    dt = bfloat16_or_skip()
    x = mean_beside_150(rng, (4, D), first).astype(dt)
    w = rng.uniform(0.5, 2.0, D).astype(np.float32)
    b = rng.standard_normal((4, D)).astype(np.float32)
    js = [np.nonzero(row == 150)[0] for row in x.astype(np.float64)]
    for i in range(4):   # minus the product to float32: exact's last bits remain
        b[i, js[i]] = -exact_norm(x[i].astype(np.float64), w, 0 * w, js[i])
    for i in range(4):
        bi = b[i]
        y = cynorm.layer_norm(x[i:i + 1], D, w, bi)[0]
        want = exact_norm(x[i].astype(np.float64), w, bi, js[i])
        assert np.median(np.abs(want)) < 2.0 ** -20 * np.median(np.abs(bi[js[i]]))
        check_half(y[js[i]], want, dt, 2.0 ** -49 * np.abs(bi[js[i]]))   # 2^-50 of the terms
        h = cynorm.add_layer_norm(x[i:i + 1], np.zeros_like(x[i:i + 1]), D, w, bi)[0][0]
        np.testing.assert_array_equal(h.view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("name", HALVES)
def test_elements_equal_to_the_mean_give_zero(rng, name):
    """A row whose mean is one of its elements: there the output is exactly 0 (bfloat16 keeps
    values down to 1e-38, so the statistics' last bits must not show)."""
    dt = half_dtype(name)
    D = 8200
    x = half_data(rng, (24, D), dt, offset_sigmas=100).astype(np.float64)   # 300 + 3 N(0, 1)
    x = np.clip(x, 258, 510)   # where both types step by 2 (float16 by 0.25)
    for row in x:   # the sum moved to 300 D by steps of 2 on random elements
        steps = int(300 * D - row.sum()) // 2
        idx = rng.choice(D, abs(steps), replace=False)
        row[idx] += 2 * np.sign(steps)
        row[0] += 300 * D - row.sum()
    x = x.astype(dt)
    assert (x.astype(np.float64).mean(-1) == 300).all()
    for out in (None, at_phase(np.empty_like(x), 6)):
        y = cynorm.layer_norm(x, D, out=out)
        at = x.astype(np.float32) == 300
        assert at.any() and (y[at].astype(np.float32) == 0).all()
        check_half(y, _ref("layer_norm", x, D), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_parameters_of_any_real_dtype(rng, name, op):
    """Parameters in the input's dtype are read by the kernels as they are, others converted
    to float32 first: the same output either way, for the values they hold."""
    dt = half_dtype(name)
    other = np.float16 if name == "bfloat16" else bfloat16_or_skip()
    x = half_data(rng, (9, 130), dt, offset_sigmas=20)
    r = half_data(rng, (9, 130), dt, offset_sigmas=0)
    w16 = rng.uniform(0.5, 2.0, 130).astype(np.float32).astype(dt)
    b16 = rng.standard_normal(130).astype(np.float32).astype(dt)
    want = None
    for w, b in [(w16, b16), (w16.astype(np.float32), b16.astype(np.float32)),
                 (w16.astype(np.float64), b16.astype(np.float64)),
                 (w16[::-1].copy()[::-1], b16), (w16.astype(other), b16.astype(other))]:
        if w.dtype == other and not (w.astype(np.float32) == w16.astype(np.float32)).all():
            continue   # the other 16-bit type does not hold these values exactly
        if op == "add_layer_norm":
            y = cynorm.add_layer_norm(x, r, 130, w, b)[0]
        else:
            y = _call(op, x, 130, w, b)
        assert y.dtype == dt
        if want is None:
            want = y
        np.testing.assert_array_equal(y.view(np.uint16), want.view(np.uint16))
    ref_x = (x.astype(np.float32) + r.astype(np.float32)).astype(dt) if op == "add_layer_norm" \
        else x
    check_half(want, _ref(op.replace("add_", ""), ref_x, 130, w16,
                      None if op == "rms_norm" else b16), dt)


@pytest.mark.parametrize("name", HALVES)
def test_statistics_are_float64(rng, name):
    dt = half_dtype(name)
    x = half_data(rng, (5, 3, 200), dt)
    y, mean, rstd = cynorm.layer_norm(x, 200, return_stats=True)
    x64 = x.astype(np.float64)
    assert mean.dtype == rstd.dtype == np.float64 and mean.shape == (5, 3, 1)
    np.testing.assert_allclose(mean, x64.mean(-1, keepdims=True), rtol=1e-15)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(x64.var(-1, keepdims=True) + 1e-5), rtol=1e-12)
    y2, rstd2 = cynorm.rms_norm(x, 200, return_stats=True)
    ms = np.mean(x64 * x64, -1, keepdims=True) + np.finfo(np.float32).eps
    np.testing.assert_allclose(rstd2, 1 / np.sqrt(ms), rtol=1e-12)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_out_in_place_and_strided_rows(rng, name, op):
    dt = half_dtype(name)
    wide = half_data(rng, (40, 129), dt, offset_sigmas=10)
    x = wide[:, 1:121]   # rows with a stride, not C-contiguous
    w = rng.uniform(0.5, 2, 120).astype(np.float32)
    ref = _ref(op, x, 120, w)
    check_half(_call(op, x, 120, w, None), ref, dt)
    for phase in (0, 2, 30):
        out = at_phase(np.empty((40, 120), dt), phase)
        y = _call(op, x, 120, w, None, out=out)
        assert y is out
        check_half(y, ref, dt)
    xc = np.ascontiguousarray(x)
    y = _call(op, xc, 120, w, None, out=xc)   # in place
    assert y is xc
    check_half(xc, ref, dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_large_outputs_stream(rng, name, op):
    """Outputs past the streaming threshold (policy.h CYNORM_STREAM_BYTES), at a phase that
    leaves partial lines at both ends of every row."""
    dt = half_dtype(name)
    x = half_data(rng, (1536, 8200), dt, offset_sigmas=100)   # 25 MB of 16-bit output
    out = at_phase(x, 6)
    y = _call(op, x, 8200, None, None, out=out)
    assert y is out
    check_half(y, _ref(op, x, 8200), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_same_bits_whatever_the_path(rng, name, op):
    """A row's 16-bit output does not depend on how it was written: streamed or not, at any
    place in a cache line (which moves the split between 16-wide, 8-wide and scalar blocks),
    on one or two threads, alone or among 1535 other rows; in every kernels build the CPU
    runs, each within one ulp.  Each block is computed as the float32 rows compute it
    (core/halves_rows.h: fused multiply-add where the compiler fuses the float32 row's, and a
    lane redone in float64 alone), so a block's width cannot change its bits; builds that
    fused some blocks and not others, or redid a whole block in float64 for one lane, differed
    in some 1e-5 of the outputs."""
    from cynorm import _isa

    dt = half_dtype(name)
    kind = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    D = 8200   # rows at every phase; 25 MB of 16-bit output: streamed
    x = half_data(rng, (1536, D), dt, offset_sigmas=20)
    w = rng.uniform(0.5, 2.0, D).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, D).astype(np.float32) if op == "layer_norm" else None
    rows = [0, 1, 2, 3, 700, 1535]
    ref = _ref(op, x[rows], D, w, b)

    def run(k, xs, y, T):
        if op == "layer_norm":
            k.layer_norm(xs, y, D, w, b, None, None, 1e-5, T, half=getattr(k, kind))
        else:
            k.rms_norm(xs, y, D, w, None, 1e-5, T, half=getattr(k, kind))
        return y

    for level in _isa.available():
        k = _isa.load(level)
        streamed = run(k, x, at_phase(x, 6), 2)
        check_half(streamed[rows], ref, dt)
        for T in (1, 2):
            for phase in (0, 2, 16, 34):
                few = run(k, x[rows], at_phase(x[rows], phase), T)   # plain stores
                np.testing.assert_array_equal(few.view(np.uint16), streamed[rows].view(np.uint16),
                                              err_msg=f"{level}, {T} threads, phase {phase}")


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_residual_forms(rng, name, op):
    dt = half_dtype(name)
    x = half_data(rng, (3, 11, 513), dt, offset_sigmas=30)
    r = half_data(rng, (3, 11, 513), dt, offset_sigmas=0)
    w = rng.uniform(0.5, 2, 513).astype(dt)
    fn = getattr(cynorm, op)
    y, h = fn(x, r, 513, w) if op == "add_rms_norm" else fn(x, r, 513, w, None)
    # h: the sum rounded once to the 16-bit type (torch's add)
    want_h = (x.astype(np.float32) + r.astype(np.float32)).astype(dt)
    assert h.dtype == dt
    np.testing.assert_array_equal(h.view(np.uint16), want_h.view(np.uint16))
    check_half(y, _ref(op[4:], want_h, 513, w), dt)
    # in place: y over x, h over the residual
    y2, h2 = fn(x, r, 513, w, out=x, residual_out=r) if op == "add_rms_norm" else fn(
        x, r, 513, w, None, out=x, residual_out=r)
    assert y2 is x and h2 is r
    np.testing.assert_array_equal(r.view(np.uint16), want_h.view(np.uint16))
    np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_masks(rng, name, op):
    dt = half_dtype(name)
    x = half_data(rng, (4, 9, 96), dt, offset_sigmas=50)
    lengths = np.array([9, 0, 4, 1])
    y = _call(op, x, 96, None, None, lengths=lengths)
    for n, L in enumerate(lengths):
        assert not np.any(y[n, L:].view(np.uint16)), "padding rows must be +0"
        if L:
            np.testing.assert_array_equal(
                y[n, :L].view(np.uint16), _call(op, x[n, :L], 96, None, None).view(np.uint16))


@pytest.mark.parametrize("name", HALVES)
def test_nan_and_inf(rng, name):
    dt = half_dtype(name)
    x = half_data(rng, (4, 50), dt, offset_sigmas=0)
    x[1, 7] = np.nan
    x[2, 3] = np.inf
    y = cynorm.layer_norm(x, 50)
    assert np.isnan(y[1].astype(np.float32)).all() and np.isnan(y[2].astype(np.float32)).all()
    check_half(y[[0, 3]], _ref("layer_norm", x[[0, 3]], 50), dt)
    r = cynorm.rms_norm(x, 50)
    assert np.isnan(r[1].astype(np.float32)).all()
    # an inf with no NaN: torch's 0 for the finite elements, NaN for the inf
    r2 = r[2].astype(np.float32)
    assert np.isnan(r2[3]) and (r2[np.arange(50) != 3] == 0).all()


def test_float16_overflow_range_gives_finite_output(rng):
    """Inputs near float16's largest finite value (65504): the statistics are float64, so the
    normalized output is finite and within one ulp."""
    x = np.clip(60000 + 4000 * rng.standard_normal((6, 333)), -65504, 65504).astype(np.float16)
    x[0, :5] = 65504
    x[1, :5] = -65504
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 333, None, None)
        assert np.isfinite(y.astype(np.float32)).all()
        check_half(y, _ref(op, x, 333), np.dtype(np.float16))


def test_bfloat16_beyond_float32_squares(rng):
    """bfloat16 spans float32's range: squares that overflow float32 are rescued (the row
    redone scaled) and the output stays within one ulp."""
    dt = half_dtype("bfloat16")
    x = (1e37 * rng.standard_normal((5, 77))).astype(np.float32).astype(dt)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 77, None, None)
        assert np.isfinite(y.astype(np.float32)).all()
        check_half(y, _ref(op, x, 77), dt)


@pytest.mark.parametrize("name", HALVES)
def test_subnormal_inputs_and_outputs(rng, name):
    dt = half_dtype(name)
    tiny = float(np.finfo(np.float16).smallest_normal if name == "float16" else 1.1754944e-38)
    # inputs: subnormal 16-bit values (eps 0, so their own spread is what is normalized)
    x = (tiny * rng.uniform(-0.9, 0.9, (6, 40))).astype(np.float32).astype(dt)
    assert np.any(x.astype(np.float32) != 0)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 40, None, None, eps=0.0)
        check_half(y, _ref(op, x, 40, eps=0.0), dt)
    # outputs: a weight small enough that the normalized values are subnormal halves
    x = half_data(rng, (6, 40), dt, offset_sigmas=0, scale=1.0)
    w = np.full(40, tiny / 16, np.float32)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 40, w, None)
        assert np.any((y.astype(np.float32) != 0) & (np.abs(y.astype(np.float32)) < tiny))
        check_half(y, _ref(op, x, 40, w), dt)


@pytest.mark.parametrize("name", HALVES)
def test_every_kernels_module(rng, name):
    """The conversions of every built kernels module (the baseline's portable scalar ones,
    F16C in the AVX2 build), on tails, subnormals, NaN and values that round up."""
    from cynorm import _isa

    dt = half_dtype(name)
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    x = half_data(rng, (9, 203), dt, offset_sigmas=5)
    x[3, 5] = np.nan
    w = np.full(203, 1e-6, np.float32)
    w[:100] = rng.uniform(0.5, 70000.0 if name == "float16" else 1e30, 100)
    ref = _ref("layer_norm", x, 203, w)
    levels = _isa.available()
    assert "baseline" in levels
    for level in levels:
        k = _isa.load(level)
        y = np.empty_like(x)
        k.layer_norm(x.view(np.uint16), y.view(np.uint16), 203, w, None, None, None, 1e-5, 2,
                     None, True, None, None, getattr(k, kind_name))
        ok = np.arange(9) != 3
        check_half(y[ok], ref[ok], dt)
        assert np.isnan(y[3].astype(np.float32)).all(), level


@pytest.mark.parametrize("name", HALVES)
def test_conversions_match_numpy_casts(rng, name):
    """The other ops' float32 <-> 16-bit conversions (the kernels' convert_half, every built
    module): the same bits as NumPy's (float16) and ml_dtypes' (bfloat16) casts, on ties,
    overflow, subnormals and inf, in both directions; NaN where they give NaN (the payloads
    differ: NumPy keeps a signalling NaN signalling, ml_dtypes gives one NaN for all, the
    kernels quiet the payload they keep)."""
    from cynorm import _isa
    from cynorm._validation import cast, half_kind

    dt = half_dtype(name)
    x = (rng.standard_normal(50_003) * 3.0 ** rng.integers(-40, 40, 50_003)).astype(np.float32)
    bits16 = rng.integers(0, 1 << 16, 4096, dtype=np.uint16)
    ties = bits16.view(dt).astype(np.float32).view(np.uint32)
    ties = (ties + np.uint32(0x1000 if name == "float16" else 0x8000)).view(np.float32)
    x = np.concatenate([x, ties, np.array([np.nan, -np.inf, np.inf, 65504, 65520, 70000,
                                           1e-8, -3e-39, 0.0, -0.0], np.float32)])
    with np.errstate(all="ignore"):
        want = x.astype(dt)
    back = want.astype(np.float32)

    def same(a, b, bits):
        nan = np.isnan(b.astype(np.float32))
        assert (np.isnan(a.astype(np.float32)) == nan).all()
        assert np.array_equal(a.view(bits)[~nan], b.view(bits)[~nan])

    same(cast(x, dt), want, np.uint16)
    same(cast(want, np.dtype(np.float32)), back, np.uint32)
    for level in _isa.available():   # every kernels module, on one and two threads
        for threads in (1, 2):
            y = np.empty_like(want)
            _isa.load(level).convert_half(x, y, half_kind(dt), threads)
            same(y, want, np.uint16)
            z = np.empty_like(back)
            _isa.load(level).convert_half(want, z, half_kind(dt), threads)
            same(z, back, np.uint32)


@pytest.mark.parametrize("name", HALVES)
def test_other_ops_convert(rng, name):
    """BatchNorm, GroupNorm, InstanceNorm and the moments take 16-bit input and return the
    input's dtype."""
    dt = half_dtype(name)
    x = half_data(rng, (8, 6, 20), dt, offset_sigmas=20)
    x64 = x.astype(np.float64)
    y = cynorm.batch_norm(x, training=True)
    assert y.dtype == dt
    check_half(y, reference_norm(x64, (0, 2)), dt)
    y = cynorm.group_norm(x, 3)
    assert y.dtype == dt
    check_half(y, reference_norm(x64.reshape(8, 3, 40), (2,)).reshape(x.shape), dt)
    y = cynorm.instance_norm(x)
    assert y.dtype == dt
    check_half(y, reference_norm(x64, (2,)), dt)
    m = cynorm.moments(x, axis=(0, 2))
    np.testing.assert_allclose(m.mean, x64.mean((0, 2)), rtol=1e-14)


@pytest.mark.parametrize("name", HALVES)
def test_backward_in_the_input_dtype(rng, name):
    dt = half_dtype(name)
    x = half_data(rng, (16, 64), dt, offset_sigmas=10)
    g = half_data(rng, (16, 64), dt, offset_sigmas=0, scale=1.0)
    w = rng.uniform(0.5, 2, 64).astype(dt)
    _, mean, rstd = cynorm.layer_norm(x, 64, w, None, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(g, x, mean, rstd, 64, w, w)
    assert dx.dtype == dw.dtype == db.dtype == dt
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    xh = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(db.astype(np.float64), g64.sum(0), rtol=2e-2, atol=1e-2)
    np.testing.assert_allclose(dw.astype(np.float64), (g64 * xh).sum(0), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "batch_norm", "group_norm"])
def test_parameter_gradients_in_the_parameters_dtype(rng, name, op):
    """16-bit input: dx in its dtype; a float32 parameter's gradient float32 (torch's rule),
    a 16-bit one's in the 16-bit dtype; both the float32 sums' values."""
    dt = half_dtype(name)
    x = half_data(rng, (8, 4, 32), dt, offset_sigmas=5)
    g = half_data(rng, (8, 4, 32), dt, offset_sigmas=0, scale=1.0)
    w32 = rng.uniform(0.5, 2, 32 if op in ("layer_norm", "rms_norm") else 4).astype(np.float32)
    got = {}
    for w in (w32, w32.astype(dt)):
        if op == "layer_norm":
            _, mean, rstd = cynorm.layer_norm(x, 32, w, w, return_stats=True)
            out = cynorm.layer_norm_backward(g, x, mean, rstd, 32, w, w)
        elif op == "rms_norm":
            _, rstd = cynorm.rms_norm(x, 32, w, return_stats=True)
            out = cynorm.rms_norm_backward(g, x, rstd, 32, w) + (None,)
        elif op == "batch_norm":
            _, mean, invstd = cynorm.batch_norm(x, None, None, w, w, True, 0.1, 1e-5,
                                                return_stats=True)
            out = cynorm.batch_norm_backward(g, x, mean, invstd, w, True, bias=w)
        else:
            _, mean, rstd = cynorm.group_norm(x, 2, w, w, return_stats=True)
            out = cynorm.group_norm_backward(g, x, mean, rstd, 2, w, bias=w)
        dx, dw, db = out
        assert dx.dtype == dt and dw.dtype == w.dtype
        assert db is None or db.dtype == w.dtype
        got[w.dtype] = dw
    np.testing.assert_allclose(got[dt].astype(np.float32), got[np.dtype(np.float32)],
                               rtol=np.finfo(np.float16).eps if name == "float16" else 2 ** -7)


def test_bfloat16_recognized_without_importing_ml_dtypes():
    import subprocess
    import sys

    code = ("import sys, cynorm, numpy as np; cynorm.layer_norm(np.ones((2, 3)), 3); "
            "assert 'ml_dtypes' not in sys.modules, 'import cynorm imported ml_dtypes'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_dtypes_still_raise():
    with pytest.raises(TypeError, match="bfloat16"):
        cynorm.layer_norm(np.ones((2, 3), np.complex64), 3)
    x = np.ones((2, 3), np.float16)
    with pytest.raises(TypeError, match="out must have dtype float16"):
        cynorm.layer_norm(x, 3, out=np.empty((2, 3), np.float32))


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_torch_half_tensors_under_autograd(rng, torch, name, op):
    import cynorm.torch as ct

    half_dtype(name)   # bfloat16 needs ml_dtypes
    tdt = getattr(torch, name)
    x0 = torch.from_numpy(50 + 3 * rng.standard_normal((12, 96)).astype(np.float32))
    x = x0.to(tdt).requires_grad_()
    xt = x0.to(tdt).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 2, 96).astype(np.float32)).to(tdt).requires_grad_()
    wt = w.detach().clone().requires_grad_()
    if op == "layer_norm":
        y = ct.layer_norm(x, (96,), w, None)
        yt = torch.nn.functional.layer_norm(xt, (96,), wt, None)
    else:
        y = ct.rms_norm(x, (96,), w)
        yt = torch.nn.functional.rms_norm(xt, (96,), wt)
    assert y.dtype == tdt
    # both against the float64 reference: cynorm within 1 ulp, torch's own half result close
    ref = torch.from_numpy(_ref(op, x.detach().float().numpy().astype(np.float64), 96,
                                w.detach().float().numpy()))
    ulp = torch.finfo(tdt).eps * ref.abs().clamp(min=1.0)
    assert ((y.double() - ref).abs() <= ulp).all()
    assert ((yt.double() - ref).abs() <= 4 * ulp).all()
    same_gradients_as_torch(torch, (y, x, w), (yt, xt, wt), 20)


@pytest.mark.parametrize("name", HALVES)
def test_moments_read_16_bit_data(rng, name):
    """cynorm.moments on 16-bit x (both layouts, a mask, inf): the kernels widen it as they
    read it, and the moments are those of a float32 copy."""
    dt = half_dtype(name)
    cases = [(half_data(rng, (3000, 40), dt), 0, None),
             (half_data(rng, (8, 6, 200), dt), (0, 2), None),
             (half_data(rng, (50, 30, 7), dt), (0, 1), rng.random((50, 30)) < 0.6)]
    for x, axis, mask in cases:
        m16 = cynorm.moments(x, axis=axis, mask=mask)
        m32 = cynorm.moments(x.astype(np.float32), axis=axis, mask=mask)
        np.testing.assert_array_equal(m16.count, m32.count)
        np.testing.assert_allclose(m16.mean, m32.mean, rtol=1e-14)
        np.testing.assert_allclose(m16.var(), m32.var(), rtol=1e-12)
        x64 = x.astype(np.float64)
        if mask is None:
            np.testing.assert_allclose(m16.mean, x64.mean(axis=axis), rtol=1e-13)
    x = half_data(rng, (300, 5), dt, offset_sigmas=3)
    x[7, 2] = np.inf
    m = cynorm.moments(x, axis=0)
    assert np.isinf(m.mean[2]) or np.isnan(m.mean[2])
    assert np.isfinite(m.mean[[0, 1, 3, 4]]).all()
