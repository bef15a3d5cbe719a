"""16-bit floats (float16, bfloat16): read and written by the kernels of the row norms
(LayerNorm, RMSNorm and their residual forms), of BatchNorm's forward and of the group norms'
forward; converted by the other ops.  Each output element is within
one unit in the last place of the correctly rounded float64 reference computed from the same
16-bit input."""
import numpy as np
import pytest

import cynorm
from conftest import (at_phase, bfloat16_or_skip, correctly_rounded, half_dtype, optional,
                      reference_norm, reference_rms, ulps16)

HALVES = ["float16", "bfloat16"]


def _data(rng, shape, dt, offset_sigmas=1e3, scale=3.0):
    """16-bit data whose mean lies offset_sigmas standard deviations from zero."""
    x = scale * offset_sigmas + scale * rng.standard_normal(shape)
    return x.astype(np.float32).astype(dt)


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


def _params(rng, n, params, dt):
    """weight and bias of n features: None ("none"), float32 or the input's dtype ("input")."""
    if params == "none":
        return None, None
    pdt = np.float32 if params == "float32" else dt
    return rng.uniform(0.5, 2.0, n).astype(pdt), rng.standard_normal(n).astype(pdt)


def _check(y, ref, dt):
    assert y.dtype == dt
    u = ulps16(y, correctly_rounded(ref, dt))
    assert u.max() <= 1, f"{int(u.max())} ulps at {np.unravel_index(u.argmax(), u.shape)}"


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("D", [1, 7, 64, 300, 4099])
@pytest.mark.parametrize("params", ["none", "float32", "input"])
def test_within_one_ulp_of_the_reference(rng, name, op, D, params):
    dt = half_dtype(name)
    x = _data(rng, (37, D), dt)
    w, b = _params(rng, D, params, dt)
    y = _call(op, x, D, w, b)
    _check(y, _ref(op, x, D, w, b), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("D", [16, 203, 4096])
def test_bias_cancelling_the_product(rng, name, D):
    """Outputs far smaller than their terms: b chosen as minus the product (to float32), so
    that most outputs are the product's last bits; the kernels' float32 terms alone would be
    several 16-bit ulps off there (core/halves.h computes such blocks again in float64)."""
    dt = half_dtype(name)
    x = _data(rng, (24, D), dt, offset_sigmas=50)
    w = rng.uniform(0.5, 2.0, D).astype(np.float32)
    x64 = x.astype(np.float64)
    z = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    b = (-(z[7] * w)).astype(np.float32)   # row 7 cancels almost everywhere, others partly
    ref = _ref("layer_norm", x, D, w, b)
    assert np.median(np.abs(ref[7])) < 1e-5 * np.median(np.abs(b))
    _check(cynorm.layer_norm(x, D, w, b), ref, dt)
    out = at_phase(np.empty_like(x), 2)
    _check(cynorm.layer_norm(x, D, w, b, out=out), ref, dt)


@pytest.mark.parametrize("name", HALVES)
def test_elements_equal_to_the_mean_give_zero(rng, name):
    """A row whose mean is one of its elements: there the output is exactly 0 (bfloat16 keeps
    values down to 1e-38, so the statistics' last bits must not show)."""
    dt = half_dtype(name)
    D = 8200
    x = _data(rng, (24, D), dt, offset_sigmas=100).astype(np.float64)   # 300 + 3 N(0, 1)
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
        _check(y, _ref("layer_norm", x, D), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_layer_norm"])
def test_parameters_of_any_real_dtype(rng, name, op):
    """Parameters in the input's dtype are read by the kernels as they are, others converted
    to float32 first: the same output either way, for the values they hold."""
    dt = half_dtype(name)
    other = np.float16 if name == "bfloat16" else bfloat16_or_skip()
    x = _data(rng, (9, 130), dt, offset_sigmas=20)
    r = _data(rng, (9, 130), dt, offset_sigmas=0)
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
    _check(want, _ref(op.replace("add_", ""), ref_x, 130, w16,
                      None if op == "rms_norm" else b16), dt)


@pytest.mark.parametrize("name", HALVES)
def test_statistics_are_float64(rng, name):
    dt = half_dtype(name)
    x = _data(rng, (5, 3, 200), dt)
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
    wide = _data(rng, (40, 129), dt, offset_sigmas=10)
    x = wide[:, 1:121]   # rows with a stride, not C-contiguous
    w = rng.uniform(0.5, 2, 120).astype(np.float32)
    ref = _ref(op, x, 120, w)
    _check(_call(op, x, 120, w, None), ref, dt)
    for phase in (0, 2, 30):
        out = at_phase(np.empty((40, 120), dt), phase)
        y = _call(op, x, 120, w, None, out=out)
        assert y is out
        _check(y, ref, dt)
    xc = np.ascontiguousarray(x)
    y = _call(op, xc, 120, w, None, out=xc)   # in place
    assert y is xc
    _check(xc, ref, dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_large_outputs_stream(rng, name, op):
    """Outputs past the streaming threshold (policy.h CYNORM_STREAM_BYTES), at a phase that
    leaves partial lines at both ends of every row."""
    dt = half_dtype(name)
    x = _data(rng, (1536, 8200), dt, offset_sigmas=100)   # 25 MB of 16-bit output
    out = at_phase(x, 6)
    y = _call(op, x, 8200, None, None, out=out)
    assert y is out
    _check(y, _ref(op, x, 8200), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_residual_forms(rng, name, op):
    dt = half_dtype(name)
    x = _data(rng, (3, 11, 513), dt, offset_sigmas=30)
    r = _data(rng, (3, 11, 513), dt, offset_sigmas=0)
    w = rng.uniform(0.5, 2, 513).astype(dt)
    fn = getattr(cynorm, op)
    y, h = fn(x, r, 513, w) if op == "add_rms_norm" else fn(x, r, 513, w, None)
    # h: the sum rounded once to the 16-bit type (torch's add)
    want_h = (x.astype(np.float32) + r.astype(np.float32)).astype(dt)
    assert h.dtype == dt
    np.testing.assert_array_equal(h.view(np.uint16), want_h.view(np.uint16))
    _check(y, _ref(op[4:], want_h, 513, w), dt)
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
    x = _data(rng, (4, 9, 96), dt, offset_sigmas=50)
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
    x = _data(rng, (4, 50), dt, offset_sigmas=0)
    x[1, 7] = np.nan
    x[2, 3] = np.inf
    y = cynorm.layer_norm(x, 50)
    assert np.isnan(y[1].astype(np.float32)).all() and np.isnan(y[2].astype(np.float32)).all()
    _check(y[[0, 3]], _ref("layer_norm", x[[0, 3]], 50), dt)
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
        _check(y, _ref(op, x, 333), np.dtype(np.float16))


def test_bfloat16_beyond_float32_squares(rng):
    """bfloat16 spans float32's range: squares that overflow float32 are rescued (the row
    redone scaled) and the output stays within one ulp."""
    dt = half_dtype("bfloat16")
    x = (1e37 * rng.standard_normal((5, 77))).astype(np.float32).astype(dt)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 77, None, None)
        assert np.isfinite(y.astype(np.float32)).all()
        _check(y, _ref(op, x, 77), dt)


@pytest.mark.parametrize("name", HALVES)
def test_subnormal_inputs_and_outputs(rng, name):
    dt = half_dtype(name)
    tiny = float(np.finfo(np.float16).smallest_normal if name == "float16" else 1.1754944e-38)
    # inputs: subnormal 16-bit values (eps 0, so their own spread is what is normalized)
    x = (tiny * rng.uniform(-0.9, 0.9, (6, 40))).astype(np.float32).astype(dt)
    assert np.any(x.astype(np.float32) != 0)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 40, None, None, eps=0.0)
        _check(y, _ref(op, x, 40, eps=0.0), dt)
    # outputs: a weight small enough that the normalized values are subnormal halves
    x = _data(rng, (6, 40), dt, offset_sigmas=0, scale=1.0)
    w = np.full(40, tiny / 16, np.float32)
    for op in ("layer_norm", "rms_norm"):
        y = _call(op, x, 40, w, None)
        assert np.any((y.astype(np.float32) != 0) & (np.abs(y.astype(np.float32)) < tiny))
        _check(y, _ref(op, x, 40, w), dt)


@pytest.mark.parametrize("name", HALVES)
def test_every_kernels_module(rng, name):
    """The conversions of every built kernels module (the baseline's portable scalar ones,
    F16C in the AVX2 build), on tails, subnormals, NaN and values that round up."""
    from cynorm import _isa

    dt = half_dtype(name)
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    x = _data(rng, (9, 203), dt, offset_sigmas=5)
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
        _check(y[ok], ref[ok], dt)
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
    x = _data(rng, (8, 6, 20), dt, offset_sigmas=20)
    x64 = x.astype(np.float64)
    y = cynorm.batch_norm(x, training=True)
    assert y.dtype == dt
    _check(y, reference_norm(x64, (0, 2)), dt)
    y = cynorm.group_norm(x, 3)
    assert y.dtype == dt
    _check(y, reference_norm(x64.reshape(8, 3, 40), (2,)).reshape(x.shape), dt)
    y = cynorm.instance_norm(x)
    assert y.dtype == dt
    _check(y, reference_norm(x64, (2,)), dt)
    m = cynorm.moments(x, axis=(0, 2))
    np.testing.assert_allclose(m.mean, x64.mean((0, 2)), rtol=1e-14)


@pytest.mark.parametrize("name", HALVES)
def test_backward_in_the_input_dtype(rng, name):
    dt = half_dtype(name)
    x = _data(rng, (16, 64), dt, offset_sigmas=10)
    g = _data(rng, (16, 64), dt, offset_sigmas=0, scale=1.0)
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
    x = _data(rng, (8, 4, 32), dt, offset_sigmas=5)
    g = _data(rng, (8, 4, 32), dt, offset_sigmas=0, scale=1.0)
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


def _same_gradients_as_torch(torch, ours, theirs, w_atol):
    """Backward of (y, x, w) tensors, cynorm's and torch's, from the same random grad_out: the
    gradients in the tensors' dtype and within a few of its ulps of torch's (weight's absolute
    tolerance w_atol of them: a sum over many elements)."""
    (y, x, w), (yt, xt, wt) = ours, theirs
    tdt = x.dtype
    g = torch.randn(y.shape).to(tdt)
    y.backward(g)
    yt.backward(g)
    assert x.grad.dtype == tdt and w.grad.dtype == tdt
    tol = 8 * torch.finfo(tdt).eps
    torch.testing.assert_close(x.grad.float(), xt.grad.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(w.grad.float(), wt.grad.float(), rtol=tol, atol=tol * w_atol)


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
    _same_gradients_as_torch(torch, (y, x, w), (yt, xt, wt), 20)


# ---- BatchNorm: its 16-bit output from the kernels (core/halves.pxi's affine_half) ----------

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
    x = _data(rng, shape, dt)
    ax = axis % x.ndim
    C = shape[ax]
    w, b = _params(rng, C, params, dt)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    rm, rv = np.zeros(C, dt), np.ones(C, dt)
    y, mean, invstd = cynorm.batch_norm(x, rm, rv, w, b, True, axis=axis, return_stats=True)
    _check(y, _bn_ref(x64, ax, x64.mean(red), x64.var(red), w, b), dt)
    np.testing.assert_allclose(mean, x64.mean(red), rtol=1e-12)
    assert rm.dtype == rv.dtype == dt and not np.array_equal(rm, np.zeros(C, dt))
    ye = cynorm.batch_norm(x, rm, rv, w, b, False, axis=axis)
    _check(ye, _bn_ref(x64, ax, rm.astype(np.float64), rv.astype(np.float64), w, b), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, axis", [((64, 40), 1), ((4, 6, 100), 1)])
def test_batch_norm_bias_cancelling_the_product(rng, name, shape, axis):
    """Eval outputs far smaller than their terms (the bias is minus the product for one
    sample): float64 arithmetic keeps them within one ulp."""
    dt = half_dtype(name)
    x = _data(rng, shape, dt, offset_sigmas=50)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(np.float32) + 150
    rv = rng.uniform(1, 4, C).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    x64 = x.astype(np.float64)
    first = x64[0].reshape(C, -1)[:, 0]   # sample 0's first element of each feature
    b = (-(first - rm) / np.sqrt(rv.astype(np.float64) + 1e-5) * w).astype(np.float32)
    ref = _bn_ref(x64, axis, rm.astype(np.float64), rv.astype(np.float64), w, b)
    assert np.median(np.abs(ref[0].reshape(C, -1)[:, 0])) < 1e-4 * np.median(np.abs(b))
    _check(cynorm.batch_norm(x, rm, rv, w, b, False, axis=axis), ref, dt)


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_out_in_place_threads_and_every_kernels_build(rng, name):
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = _data(rng, (300, 7, 40), dt, offset_sigmas=30)
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
    _check(y1, ref, dt)
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
            _check(y, ref, dt)


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_masked_feature_last(rng, name):
    """(N, T, C) with lengths: the statistics of the real tokens, padding written as 0, the
    real tokens as BatchNorm of those tokens alone."""
    dt = half_dtype(name)
    x = _data(rng, (5, 11, 24), dt, offset_sigmas=100)
    lengths = np.array([11, 3, 0, 7, 1])
    real = np.concatenate([x[n, :k] for n, k in enumerate(lengths)])
    rm, rv = np.zeros(24, np.float32), np.ones(24, np.float32)
    y = cynorm.batch_norm(x, rm, rv, training=True, axis=-1, lengths=lengths)
    want = cynorm.batch_norm(real, np.zeros(24, np.float32), np.ones(24, np.float32),
                             training=True)
    got = np.concatenate([y[n, :k] for n, k in enumerate(lengths)])
    r64 = real.astype(np.float64)
    _check(got, _bn_ref(r64, 1, r64.mean(0), r64.var(0)), dt)
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
    _check(y, _bn_ref(x64, 1, x64.mean(0), x64.var(0)), dt)
    x = _data(rng, (16, 4), dt, offset_sigmas=3)
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
    x = _data(rng, shape, dt, offset_sigmas=300)
    x3 = x.reshape(shape[0], shape[1], -1)
    x3[:, 2] = 512.0   # feature 2: 512 but for 516 and 508 (exact in both dtypes)
    x3[1, 2, 0] = 516.0
    x3[2, 2, 0] = 508.0
    assert x3[:, 2].astype(np.float64).mean() == 512.0
    y = cynorm.batch_norm(x, training=True).reshape(x3.shape)
    assert float(y[0, 2, 0]) == 0.0 and not y[3:, 2].astype(np.float32).any()


# ---- GroupNorm / InstanceNorm: channels-first 16-bit input read and written by the kernels --

def _gn_ref(x64, G, w=None, b=None, eps=1e-5, mean=None, var=None):
    """GroupNorm of (N, C, *) in float64 (InstanceNorm: G = C); mean / var (N, G) given or the
    groups' own."""
    N, C = x64.shape[:2]
    xg = x64.reshape(N, G, -1)
    if mean is None:
        mean, var = xg.mean(axis=2), xg.var(axis=2)
    r = ((xg - mean[..., None]) / np.sqrt(var[..., None] + eps)).reshape(x64.shape)
    shape = [1, C] + [1] * (x64.ndim - 2)
    if w is not None:
        r = r * w.astype(np.float64).reshape(shape)
    if b is not None:
        r = r + b.astype(np.float64).reshape(shape)
    return r


GN_CASES = [((8, 6, 20), 3), ((4, 64, 7, 9), 32), ((3, 8, 1000), 2), ((5, 4), 2),
            ((2, 6, 3, 4, 5), 3), ((2, 4, 3000), 4)]


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, G", GN_CASES)
@pytest.mark.parametrize("params", ["none", "float32", "input"])
def test_group_norm_within_one_ulp_of_the_reference(rng, name, shape, G, params):
    dt = half_dtype(name)
    x = _data(rng, shape, dt)
    C = shape[1]
    w, b = _params(rng, C, params, dt)
    x64 = x.astype(np.float64)
    y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)
    _check(y, _gn_ref(x64, G, w, b), dt)
    xg = x64.reshape(shape[0], G, -1)
    assert mean.dtype == rstd.dtype == np.float64
    np.testing.assert_allclose(mean, xg.mean(axis=2), rtol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xg.var(axis=2) + 1e-5), rtol=1e-12)
    if len(shape) > 2:
        yi = cynorm.instance_norm(x, weight=w, bias=b)
        _check(yi, _gn_ref(x64, C, w, b), dt)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))   # channels-last
        yl, mean_l, rstd_l = cynorm.group_norm(xl, G, w, b, axis=-1, return_stats=True)
        _check(yl, np.moveaxis(_gn_ref(x64, G, w, b), 1, -1), dt)
        np.testing.assert_allclose(mean_l, mean, rtol=1e-14)
        np.testing.assert_allclose(rstd_l, rstd, rtol=1e-12)
        yi = cynorm.instance_norm(xl, weight=w, bias=b, axis=-1)
        _check(yi, np.moveaxis(_gn_ref(x64, C, w, b), 1, -1), dt)


@pytest.mark.parametrize("name", HALVES)
def test_instance_norm_running_statistics_then_eval(rng, name):
    """Training updates the running statistics (16-bit buffers) from the 16-bit input's
    float64 moments, as for a float32 copy; eval normalizes with them, within one ulp."""
    dt = half_dtype(name)
    x = _data(rng, (6, 5, 300), dt, offset_sigmas=40)
    w = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    rm, rv = np.zeros(5, dt), np.ones(5, dt)
    x64 = x.astype(np.float64)
    batch_mean = x64.mean(axis=2).mean(axis=0)
    batch_var = x64.var(axis=2, ddof=1).mean(axis=0)
    for _ in range(3):
        want_m = 0.7 * rm.astype(np.float64) + 0.3 * batch_mean
        want_v = 0.7 * rv.astype(np.float64) + 0.3 * batch_var
        cynorm.instance_norm(x, rm, rv, w, b, momentum=0.3)
        assert rm.dtype == rv.dtype == dt
        assert ulps16(rm, correctly_rounded(want_m, dt)).max() <= 1
        assert ulps16(rv, correctly_rounded(want_v, dt)).max() <= 1
    y = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    mean = np.tile(rm.astype(np.float64), (6, 1))
    var = np.tile(rv.astype(np.float64), (6, 1))
    _check(y, _gn_ref(x64, 5, w, b, mean=mean, var=var), dt)


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_bias_cancelling_the_product(rng, name):
    """InstanceNorm in eval mode whose bias is minus the product at sample 0's first
    position: those outputs are far smaller than their terms, and still within one ulp."""
    dt = half_dtype(name)
    x = _data(rng, (4, 6, 100), dt, offset_sigmas=50)
    rm = rng.standard_normal(6).astype(np.float32) + 150
    rv = rng.uniform(1, 4, 6).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    x64 = x.astype(np.float64)
    b = (-(x64[0, :, 0] - rm) / np.sqrt(rv.astype(np.float64) + 1e-5) * w).astype(np.float32)
    mean, var = np.tile(rm.astype(np.float64), (4, 1)), np.tile(rv.astype(np.float64), (4, 1))
    ref = _gn_ref(x64, 6, w, b, mean=mean, var=var)
    assert np.median(np.abs(ref[0, :, 0])) < 1e-4 * np.median(np.abs(b))
    _check(cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False), ref, dt)


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_out_in_place_threads_and_every_kernels_build(rng, name):
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = _data(rng, (6, 8, 40, 50), dt, offset_sigmas=30)
    w = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    with cynorm.num_threads(1):
        y1 = cynorm.group_norm(x, 4, w, b)
    with cynorm.num_threads(2):
        y2, mean, rstd = cynorm.group_norm(x, 4, w, b, return_stats=True)
    _check(y1, _gn_ref(x.astype(np.float64), 4, w, b), dt)
    assert y1.tobytes() == y2.tobytes()   # the same bits on any thread count
    out = at_phase(np.empty_like(x), 6)
    assert cynorm.group_norm(x, 4, w, b, out=out) is out
    assert out.tobytes() == y1.tobytes()
    xc = x.copy()
    assert cynorm.group_norm(xc, 4, w, b, out=xc) is xc
    assert xc.tobytes() == y1.tobytes()
    strided = np.empty((6, 8, 40, 100), dt)[..., ::2]   # an out= with gaps
    assert cynorm.group_norm(x, 4, w, b, out=strided) is strided
    assert strided.tobytes() == y1.tobytes()
    for level in _isa.available():   # each kernels module (the baseline's affine in float64)
        y = np.empty_like(x)
        stats = np.empty((6, 24))
        _isa.load(level).group_norm_half(x, y, 6, 8, 2000, 4, False, w, b, 1e-5, stats, False,
                                         None, True, half_kind(dt), 2)
        _check(y, _gn_ref(x.astype(np.float64), 4, w, b), dt)
        np.testing.assert_allclose(stats[4:], np.stack([mean.ravel(), rstd.ravel()]),
                                   rtol=1e-14)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        yl = np.empty_like(xl)
        mask = np.arange(2000) < np.array([2000, 5, 0, 1999, 1000, 3])[:, None]
        _isa.load(level).group_norm_half(xl, yl, 6, 8, 2000, 4, True, w, b, 1e-5, stats,
                                         False, mask, True, half_kind(dt), 2)
        for n, k in enumerate(mask.sum(axis=1)):
            if k:
                ref = _gn_ref(x[n:n + 1].reshape(1, 8, -1)[..., :k].astype(np.float64), 4, w, b)
                _check(yl[n].reshape(-1, 8)[:k], np.moveaxis(ref, 1, -1)[0], dt)
            assert not yl[n].reshape(-1, 8)[k:].astype(np.float32).any()
    # channels-last and masked input: the same results within one ulp
    yl = cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 4, w, b, axis=-1)
    assert ulps16(np.moveaxis(yl, -1, 1), y1).max() <= 1
    x3 = x.reshape(6, 8, -1)
    lengths = np.array([2000, 1, 0, 700, 2000, 1999])
    x3l = np.ascontiguousarray(np.moveaxis(x3, 1, -1))
    for out in (None, np.ones_like(x3)):   # padding written as 0 over what out held
        ym = cynorm.group_norm(x3, 4, w, b, lengths=lengths, out=out)
        yml = cynorm.group_norm(x3l, 4, w, b, axis=-1, lengths=lengths,
                                out=None if out is None else np.ones_like(x3l))
        for n, k in enumerate(lengths):
            if k:
                ref = _gn_ref(x3[n:n + 1, :, :k].astype(np.float64), 4, w, b)
                _check(ym[n:n + 1, :, :k], ref, dt)
                _check(yml[n:n + 1, :k], np.moveaxis(ref, 1, -1), dt)
            assert not ym[n, :, k:].astype(np.float32).any()
            assert not yml[n, k:].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_nan_inf_and_huge(rng, name):
    dt = half_dtype(name)
    big = 6.0e4 if name == "float16" else 1e37
    x = (big + big * 1e-2 * rng.standard_normal((3, 4, 50))).astype(dt)
    y = cynorm.group_norm(x, 2)
    assert np.isfinite(y.astype(np.float32)).all()   # a finite result from huge inputs
    _check(y, _gn_ref(x.astype(np.float64), 2), dt)
    x = _data(rng, (3, 4, 50), dt, offset_sigmas=3)
    x[1, 0, 7] = np.nan
    x[2, 3, 9] = np.inf
    yf = cynorm.group_norm(x, 2).astype(np.float32)
    yl = cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 2, axis=-1)
    for y in (yf, np.moveaxis(yl, -1, 1).astype(np.float32)):
        assert np.isnan(y[1, :2]).all() and np.isnan(y[2, 2:]).all()
        assert np.isfinite(y[0]).all() and np.isfinite(y[1, 2:]).all()
        assert np.isfinite(y[2, :2]).all()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("C, S", [(40, 700), (24, 37), (64, 3136), (8, 16)])
def test_group_norm_channels_last_rows_widened_in_registers(rng, name, C, S):
    """Channels-last 16-bit rows are widened in registers as the float64 sweep sums them (the
    last columns of a row under a mask, the rows left over one at a time): the output within
    one ulp, and the statistics those of the channels-first path to float64's precision, for
    data far from zero, around zero, near the top of the range, and with a constant first
    block.  A mean only good to float32's precision (some 1e-9 of the standard deviation)
    would fail the mean's bound, and the one-ulp bound of outputs next to it."""
    dt = half_dtype(name)
    G = C // 8
    top = 6.0e4 if name == "float16" else 1e37
    cases = [_data(rng, (3, C, S), dt, offset_sigmas=300),
             (1e-3 * rng.standard_normal((3, C, S))).astype(np.float32).astype(dt),
             (top / 4 * rng.uniform(-1, 1, (3, C, S))).astype(np.float32).astype(dt)]
    x = (top / 8 * rng.standard_normal((3, C, S))).astype(np.float32).astype(dt)
    x[:, :, :16] = 2.0 ** -10
    cases.append(x)
    for x in cases:
        x64 = x.astype(np.float64)
        assert np.isfinite(x64).all()
        xg = x64.reshape(3, G, -1)
        _, mean, rstd = cynorm.group_norm(x, G, return_stats=True)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        for T in (1, 2):
            with cynorm.num_threads(T):
                yl, mean_l, rstd_l = cynorm.group_norm(xl, G, axis=-1, return_stats=True)
            _check(yl, np.moveaxis(_gn_ref(x64, G), 1, -1), dt)
            np.testing.assert_allclose(mean_l, xg.mean(axis=2), rtol=1e-14,
                                       atol=1e-13 * xg.std(axis=2).min())
            np.testing.assert_allclose(mean_l, mean, rtol=1e-14,
                                       atol=1e-13 * xg.std(axis=2).min())
            np.testing.assert_allclose(rstd_l, rstd, rtol=1e-12)
    lengths = np.array([S, S // 2 + 1, 0])   # masked rows are not summed
    yl = cynorm.group_norm(xl, G, axis=-1, lengths=lengths)
    for n, k in enumerate(lengths):
        if k:
            ref = np.moveaxis(_gn_ref(x64[n:n + 1, :, :k], G), 1, -1)
            _check(yl[n:n + 1, :k], ref, dt)
        assert not yl[n, k:].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_element_equal_to_the_mean_gives_zero(rng, name):
    dt = half_dtype(name)
    x = _data(rng, (3, 4, 30), dt, offset_sigmas=300)
    x[1, 2:] = 512.0   # sample 1's group 1: 512 but for 516 and 508 (exact in both dtypes)
    x[1, 2, 0] = 516.0
    x[1, 3, 5] = 508.0
    y = cynorm.group_norm(x, 2)
    assert float(y[1, 2, 1]) == 0.0 and not y[1, 3, 6:].astype(np.float32).any()
    y = np.moveaxis(cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 2, axis=-1),
                    -1, 1)
    assert float(y[1, 2, 1]) == 0.0 and not y[1, 3, 6:].astype(np.float32).any()


def test_group_norm_mean_merged_from_channels_keeps_zero():
    """A group's mean merged from its channels' means rounds at some 2^-53 of their spread:
    an element equal to the exact mean must still give 0, not that rounding times rstd.  These
    fixed draws (bfloat16, (8, 6, 20), 3 groups) each hold such an element, and gave
    1e-17-sized outputs there before the second term of the mean below 2^-50 of the standard
    deviation was taken as noise."""
    dt = bfloat16_or_skip()
    for seed in (92, 100, 211, 235):
        x = _data(np.random.default_rng(seed), (8, 6, 20), dt, offset_sigmas=20)
        x64 = x.astype(np.float64)
        xg = x64.reshape(8, 3, 40)
        assert (xg == xg.mean(axis=2, keepdims=True)).any()   # the case this is about
        _check(cynorm.group_norm(x, 3), _gn_ref(x64, 3), dt)


@pytest.mark.parametrize("name", HALVES)
def test_torch_group_norm_half_tensors_under_autograd(rng, torch, name):
    import cynorm.torch as ct

    dt = half_dtype(name)
    tdt = getattr(torch, name)
    x0 = torch.from_numpy(50 + 3 * rng.standard_normal((4, 8, 60)).astype(np.float32))
    x = x0.to(tdt).requires_grad_()
    xt = x0.to(tdt).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 2, 8).astype(np.float32)).to(tdt).requires_grad_()
    wt = w.detach().clone().requires_grad_()
    y = ct.group_norm(x, 4, w, None)
    yt = torch.nn.functional.group_norm(xt, 4, wt, None)
    assert y.dtype == tdt
    ref = _gn_ref(x.detach().float().numpy().astype(np.float64), 4,
                  w.detach().float().numpy())
    _check(y.detach().view(torch.int16).numpy().view(dt), ref, dt)
    ulp = torch.finfo(tdt).eps * torch.from_numpy(ref).abs().clamp(min=1.0)
    assert ((yt.double() - torch.from_numpy(ref)).abs() <= 4 * ulp).all()
    _same_gradients_as_torch(torch, (y, x, w), (yt, xt, wt), 40)


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_statistics_down_the_columns(rng, name):
    """(N, C) and feature-last input: the training statistics from the 16-bit rows, widened a
    block at a time in the kernels, as those of a float32 copy; the same bits on any thread
    count and within one ulp, masked too; every kernels module."""
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = _data(rng, (3000, 40), dt)
    x64 = x.astype(np.float64)
    outs = []
    for threads in (1, 2):
        with cynorm.num_threads(threads):
            outs.append(cynorm.batch_norm(x, training=True, return_stats=True))
    y, mean, invstd = outs[0]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(outs[0], outs[1]))
    _check(y, _bn_ref(x64, 1, x64.mean(0), x64.var(0)), dt)
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
    xm = _data(rng, (30, 100, 12), dt, offset_sigmas=200)
    lengths = rng.integers(0, 101, 30)
    lengths[3] = 100
    real = np.concatenate([xm[n, :k] for n, k in enumerate(lengths)]).astype(np.float64)
    with cynorm.num_threads(2):
        ym = cynorm.batch_norm(xm, training=True, axis=-1, lengths=lengths)
    got = np.concatenate([ym[n, :k] for n, k in enumerate(lengths)])
    _check(got, _bn_ref(real, 1, real.mean(0), real.var(0)), dt)


@pytest.mark.parametrize("name", HALVES)
def test_moments_read_16_bit_data(rng, name):
    """cynorm.moments on 16-bit x (both layouts, a mask, inf): the kernels widen it as they
    read it, and the moments are those of a float32 copy."""
    dt = half_dtype(name)
    cases = [(_data(rng, (3000, 40), dt), 0, None),
             (_data(rng, (8, 6, 200), dt), (0, 2), None),
             (_data(rng, (50, 30, 7), dt), (0, 1), rng.random((50, 30)) < 0.6)]
    for x, axis, mask in cases:
        m16 = cynorm.moments(x, axis=axis, mask=mask)
        m32 = cynorm.moments(x.astype(np.float32), axis=axis, mask=mask)
        np.testing.assert_array_equal(m16.count, m32.count)
        np.testing.assert_allclose(m16.mean, m32.mean, rtol=1e-14)
        np.testing.assert_allclose(m16.var(), m32.var(), rtol=1e-12)
        x64 = x.astype(np.float64)
        if mask is None:
            np.testing.assert_allclose(m16.mean, x64.mean(axis=axis), rtol=1e-13)
    x = _data(rng, (300, 5), dt, offset_sigmas=3)
    x[7, 2] = np.inf
    m = cynorm.moments(x, axis=0)
    assert np.isinf(m.mean[2]) or np.isnan(m.mean[2])
    assert np.isfinite(m.mean[[0, 1, 3, 4]]).all()
