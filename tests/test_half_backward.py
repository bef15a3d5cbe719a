"""The backward of the 16-bit row norms (LayerNorm, RMSNorm and their residual forms) in the
kernels (core/halves_backward.pxi): grad_out and x read as 16-bit, dx written as 16-bit, with
the float32 backward's arithmetic over the widened rows, to the bit; the parameter gradients
summed as for float32 input.  The forward is in test_half_precision.py,
test_half_batch_norm.py and test_half_group_norm.py."""
import numpy as np
import pytest

import cynorm
from conftest import (HALVES, correctly_rounded, half_data, half_dtype,
                      reference_norm_backward, ulps16)
from cynorm import _isa

OPS = ["layer_norm", "rms_norm"]


def _params(rng, D, params, dt):
    if params == "none":
        return None, None
    pdt = np.float32 if params == "float32" else dt
    return rng.uniform(0.5, 2.0, D).astype(pdt), rng.standard_normal(D).astype(pdt)


def _forward_stats(op, x, D, w, b):
    """(mean or None, rstd) as the forward returns them."""
    if op == "layer_norm":
        return cynorm.layer_norm(x, D, w, b, return_stats=True)[1:]
    return None, cynorm.rms_norm(x, D, w, return_stats=True)[1]


def _backward(op, g, x, mean, rstd, D, w, b, **kw):
    """(dx, dw, db) of either op (db None for rms_norm)."""
    if op == "layer_norm":
        return cynorm.layer_norm_backward(g, x, mean, rstd, D, w, bias=b, **kw)
    return cynorm.rms_norm_backward(g, x, rstd, D, w, **kw) + (None,)


def _f32(a):
    return None if a is None else a.astype(np.float32)


def _rms_backward_ref(g, x, w, eps):
    """(dx, dw) of RMSNorm over the last axis in float64."""
    g, x = g.astype(np.float64), x.astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    gw = g if w is None else g * w.astype(np.float64)
    xh = x * r
    return r * gw - xh * r * np.mean(gw * xh, axis=-1, keepdims=True), (g * xh).reshape(
        -1, x.shape[-1]).sum(0)


def _assert_same_backward(got, want, dt, params):
    """got (dx, dw, db) from 16-bit arrays: dx the float32 backward's want narrowed, to the
    bit; the parameter gradients want's, in the parameters' dtype."""
    assert got[0].dtype == dt
    np.testing.assert_array_equal(got[0].view(np.uint16), want[0].astype(dt).view(np.uint16))
    for a, c, p in zip(got[1:], want[1:], params):
        if c is None:   # no such gradient (no parameter, or RMSNorm's bias)
            assert a is None
            continue
        assert a.dtype == p.dtype
        np.testing.assert_array_equal(a, c.astype(p.dtype))


def _check_build(level, dt, dx, dx32, sums, exact=True):
    """A kernels build's 16-bit dx against the float32 kernels' dx32, and its (got, want)
    pairs of sums: close in every build, dx within one 16-bit ulp (builds may differ in a
    float32 sum's last bit, their vector widths, and the baseline has no fused multiply-add:
    where dx's terms cancel to near 0 that is many ulps of a tiny result, so there dx need
    only be within 2^-20 of the largest |dx|); in the build the CPU runs, dx to the bit, and
    with exact (the same threads: the partial sums added in the same grouping) the sums too."""
    near = np.abs(dx.astype(np.float64) - dx32) <= 2.0 ** -20 * np.nanmax(np.abs(dx32))
    assert ((ulps16(dx, dx32.astype(dt)) <= 1) | near).all(), level
    for a, c in sums:
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)
    if level == _isa.kernels.ISA:
        np.testing.assert_array_equal(dx.view(np.uint16), dx32.astype(dt).view(np.uint16))
        if exact:
            for a, c in sums:
                np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(3, 1), (7, 33), (64, 768), (13, 4099), (2, 9, 40),
                                   (301, 517)])
@pytest.mark.parametrize("params", ["none", "float32", "input"])
@pytest.mark.parametrize("residual", [False, True])
def test_same_bits_as_the_float32_backward(rng, name, op, shape, params, residual):
    """dx narrowed once from the float32 backward of the widened arrays, to the bit (the
    float32 backward is checked against float64 and torch in its own files); the parameter
    gradients its sums, in the parameters' dtype."""
    dt = half_dtype(name)
    D = shape[-1]
    x = half_data(rng, shape, dt, offset_sigmas=rng.choice([0, 30, 1e3]))
    g = half_data(rng, shape, dt, offset_sigmas=0, scale=1.0)
    gr = half_data(rng, shape, dt, offset_sigmas=0, scale=1.0) if residual else None
    w, b = _params(rng, D, params, dt)
    mean, rstd = _forward_stats(op, x, D, w, b)
    got = _backward(op, g, x, mean, rstd, D, w, b, grad_residual=gr)
    want = _backward(op, _f32(g), _f32(x), mean, rstd, D, _f32(w), _f32(b),
                     grad_residual=_f32(gr))
    _assert_same_backward(got, want, dt, (w, b))


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", OPS)
def test_the_front_end_hands_16_bit_arrays_to_the_kernels(rng, monkeypatch, name, op):
    """16-bit grad_out and x go to the kernels as they are (no float32 copies); a grad_out of
    another dtype goes through float32, as before."""
    from cynorm import _rows

    dt = half_dtype(name)
    x = half_data(rng, (6, 50), dt, offset_sigmas=10)
    g = half_data(rng, (6, 50), dt, offset_sigmas=0, scale=1.0)
    mean, rstd = _forward_stats(op, x, 50, None, None)
    seen = []

    class Spy:
        def __getattr__(self, attr):
            f = getattr(_isa.kernels, attr)

            def call(*args):
                seen.append((args[0].dtype, args[1].dtype, args[2].dtype, args[-1]))
                return f(*args)
            return call if attr.endswith("_backward") else f

    monkeypatch.setattr(_rows, "_kernels", Spy())
    dx16 = _backward(op, g, x, mean, rstd, 50, None, None)[0]
    dx32 = _backward(op, g.astype(np.float32), x, mean, rstd, 50, None, None)[0]
    assert seen[0][:3] == (dt, dt, dt) and seen[0][3] >= 0
    assert seen[1][:3] == (np.float32,) * 3 and seen[1][3] == -1
    assert dx16.dtype == dx32.dtype == dt
    np.testing.assert_array_equal(dx16.view(np.uint16), dx32.view(np.uint16))


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("offset_sigmas", [0, 1e3])
def test_within_one_ulp_of_the_float64_reference(rng, name, op, offset_sigmas):
    """dx within one 16-bit ulp of the correctly rounded float64 gradient of the same 16-bit
    input, but where the float32 arithmetic's own error (a few float32 ulps of the row's
    largest term, rstd·|g·w|) is a larger part of a dx near zero; dw and db close to the
    float64 sums."""
    dt = half_dtype(name)
    D = 384
    x = half_data(rng, (40, D), dt, offset_sigmas=offset_sigmas)
    g = half_data(rng, (40, D), dt, offset_sigmas=0, scale=1.0)
    w = rng.uniform(0.5, 2.0, D).astype(np.float32)
    mean, rstd = _forward_stats(op, x, D, w, None)
    dx, dw, db = _backward(op, g, x, mean, rstd, D, w, w)
    if op == "layer_norm":
        rdx, rdw, rdb = reference_norm_backward(g, x.astype(np.float64), (-1,), w, (D,))
    else:
        rdx, rdw = _rms_backward_ref(g, x, w, float(np.finfo(np.float32).eps))
        rdb = None
    big = np.abs(g.astype(np.float64) * w).max(axis=1, keepdims=True) * rstd.reshape(-1, 1)
    u = ulps16(dx, correctly_rounded(rdx, dt))
    far = (u > 1) & (np.abs(dx.astype(np.float64) - rdx) > 2.0 ** -20 * big)
    assert not far.any(), f"{int(u.max())} ulps at {np.unravel_index(u.argmax(), u.shape)}"
    tol = 2.0 ** -20 * np.abs(g.astype(np.float64)).sum(0) * 4
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=tol.max())
    if rdb is not None:
        np.testing.assert_allclose(db, rdb, rtol=1e-5, atol=tol.max())


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("op", OPS)
def test_masks_and_padding(rng, name, op):
    """Padding rows get dx = 0 (with grad_residual: its rows) and add nothing to dw, db: the
    result equals the backward of the real rows alone."""
    dt = half_dtype(name)
    N, L, D = 5, 11, 96
    x = half_data(rng, (N, L, D), dt, offset_sigmas=20)
    g = half_data(rng, (N, L, D), dt, offset_sigmas=0, scale=1.0)
    gr = half_data(rng, (N, L, D), dt, offset_sigmas=0, scale=1.0)
    w, b = _params(rng, D, "input", dt)
    lengths = rng.integers(0, L + 1, N)
    lengths[0] = 0
    mean, rstd = _forward_stats(op, x, D, w, b)
    for res in (None, gr):
        dx, dw, db = _backward(op, g, x, mean, rstd, D, w, b, lengths=lengths,
                               grad_residual=res)
        real = np.arange(L)[None, :] < lengths[:, None]
        pad = np.zeros_like(x) if res is None else res
        np.testing.assert_array_equal(dx[~real].view(np.uint16), pad[~real].view(np.uint16))
        st = (None if mean is None else mean[real], rstd[real])
        cut = _backward(op, g[real], x[real], st[0], st[1], D, w, b,
                        grad_residual=None if res is None else res[real])
        np.testing.assert_array_equal(dx[real].view(np.uint16), cut[0].view(np.uint16))
        np.testing.assert_allclose(dw.astype(np.float32), cut[1].astype(np.float32),
                                   rtol=2e-2, atol=1e-2)
        if db is not None:
            np.testing.assert_allclose(db.astype(np.float32), cut[2].astype(np.float32),
                                       rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("residual", [False, True])
def test_threads_and_every_kernels_build_agree(rng, name, residual):
    """The same bits from 1 and 2 threads, and from every kernels build the CPU runs, called
    directly with 16-bit arrays (strided rows of g and x, a 16-bit weight; with and without the
    residual stream's gradient, whose rows are widened into scratch), and those of the float32
    backward of the widened rows."""
    dt = half_dtype(name)
    M, D = 203, 300
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    x = half_data(rng, (M, D + 20), dt, offset_sigmas=40)[:, 5:D + 5]
    g = half_data(rng, (M, D + 7), dt, offset_sigmas=0, scale=1.0)[:, :D]
    gr = half_data(rng, (M, D), dt, offset_sigmas=0, scale=1.0) if residual else None
    w = rng.uniform(0.5, 2.0, D).astype(dt)
    mean, rstd = _forward_stats("layer_norm", np.ascontiguousarray(x), D, w, None)
    mean, rstd = mean.reshape(M), rstd.reshape(M)
    mask = rng.random(M) < 0.8
    results = []
    for level in _isa.available():
        k = _isa.load(level)
        for T in (1, 2):
            for m in (None, mask):
                dx = np.empty((M, D), dt)
                dw = np.empty(D, np.float32)
                db = np.empty(D, np.float32)
                k.layer_norm_backward(g, x, dx, D, w, mean, rstd, dw, db, T, m, gr,
                                      getattr(k, kind_name))
                results.append((level, T, m is None, dx, dw, db))
    k = _isa.kernels
    for m in (None, mask):
        for T32 in (1, 2):
            dx32 = np.empty((M, D), np.float32)
            dw32 = np.empty(D, np.float32)
            db32 = np.empty(D, np.float32)
            k.layer_norm_backward(g.astype(np.float32), x.astype(np.float32), dx32, D,
                                  w.astype(np.float32), mean, rstd, dw32, db32, T32, m,
                                  None if gr is None else gr.astype(np.float32))
            for level, T, plain, dx, dw, db in results:
                if plain != (m is None):
                    continue
                _check_build(level, dt, dx, dx32, [(dw, dw32), (db, db32)], T == T32)


@pytest.mark.parametrize("name", HALVES)
def test_non_finite_and_huge(rng, name):
    """A row with NaN or inf gives a non-finite dx in that row only; float16 values near its
    65504 limit give a finite dx (the float32 arithmetic does not overflow)."""
    dt = half_dtype(name)
    x = half_data(rng, (6, 64), dt, offset_sigmas=5)
    g = half_data(rng, (6, 64), dt, offset_sigmas=0, scale=1.0)
    x[1, 3] = np.nan
    g[2, 7] = np.inf
    big = np.finfo(dt).max if name == "float16" else 1e30
    x[4] = (rng.uniform(-1, 1, 64) * float(big)).astype(dt)
    mean, rstd = _forward_stats("layer_norm", x, 64, None, None)
    dx = cynorm.layer_norm_backward(g, x, mean, rstd, 64)[0].astype(np.float32)
    assert not np.isfinite(dx[1]).all() and not np.isfinite(dx[2]).all()
    assert np.isfinite(dx[[0, 3, 4, 5]]).all()


# ---- BatchNorm (ops/batch_norm_backward_half.pxi) ------------------------------------------

# (N, C) and short L down the columns, long L by rows, feature-last, 4-D
BN_LAYOUTS = [((40, 24), 1), ((6, 5, 9), 1), ((6, 5, 70), 1), ((4, 9, 12), -1),
              ((3, 4, 8, 9), 1), ((2, 3, 2100), 1), ((1000, 3), 1), ((3001, 45), 1)]


def _bn_case(rng, dt, shape, axis, params, training, offset_sigmas=30):
    x = half_data(rng, shape, dt, offset_sigmas=offset_sigmas)
    g = half_data(rng, shape, dt, offset_sigmas=0, scale=1.0)
    C = shape[axis]
    w, b = _params(rng, C, params, dt)
    rm, rv = np.zeros(C, np.float32) + 90, np.ones(C, np.float32) * 9
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, w, b, training, axis=axis,
                                        return_stats=True)
    return x, g, w, b, mean, invstd


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, axis", BN_LAYOUTS)
@pytest.mark.parametrize("params", ["none", "float32", "input"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_same_bits_as_the_float32_backward(rng, name, shape, axis, params,
                                                      training):
    dt = half_dtype(name)
    x, g, w, b, mean, invstd = _bn_case(rng, dt, shape, axis, params, training)
    got = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=axis, bias=b)
    want = cynorm.batch_norm_backward(_f32(g), _f32(x), mean, invstd, _f32(w), training,
                                      axis=axis, bias=_f32(b))
    _assert_same_backward(got, want, dt, (w, b))


@pytest.mark.parametrize("name", HALVES)
def test_batch_norm_large_training_by_feature_groups(rng, name):
    """An (N, C, L) input large enough for the feature-group pass (GROUP_MIN_BYTES) in 16 bits
    as in float32: the 16-bit backward gives the float32 one's bits."""
    dt = half_dtype(name)
    x, g, w, b, mean, invstd = _bn_case(rng, dt, (4, 128, 16384), 1, "float32", True)
    got = cynorm.batch_norm_backward(g, x, mean, invstd, w, True, bias=b)
    want = cynorm.batch_norm_backward(_f32(g), _f32(x), mean, invstd, w, True, bias=b)
    _assert_same_backward(got, want, dt, (w, b))


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_masked_threads_and_every_kernels_build(rng, name, training):
    """Feature-last with lengths: padding gets dx = 0 and the real tokens the backward of those
    tokens alone; 1 and 2 threads and every kernels build called directly agree with the
    float32 kernels (the same bits in the build the CPU runs, with the same threads)."""
    dt = half_dtype(name)
    N, L, C = 6, 37, 40
    x, g, w, b, mean, invstd = _bn_case(rng, dt, (N, L, C), -1, "input", training)
    lengths = rng.integers(0, L + 1, N)
    lengths[1] = 0
    _, mean, invstd = cynorm.batch_norm(x, None, None, w, b, True, axis=-1, lengths=lengths,
                                        return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=-1, bias=b,
                                            lengths=lengths)
    real = np.arange(L)[None, :] < lengths[:, None]
    assert not dx[~real].astype(np.float32).any()
    cut = cynorm.batch_norm_backward(g[real], x[real], mean, invstd, w, training, bias=b)
    # (the masked sums add the real rows one at a time, the cut ones four at a time: their
    # float64 sums may differ in the last bits, and dx by one ulp)
    assert ulps16(dx[real], cut[0]).max() <= 1
    np.testing.assert_allclose(dw.astype(np.float32), cut[1].astype(np.float32), rtol=1e-2)
    np.testing.assert_allclose(db.astype(np.float32), cut[2].astype(np.float32), rtol=1e-2,
                               atol=1e-2)
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    mask = real.reshape(-1)
    g2, x2 = g.reshape(N * L, C), x.reshape(N * L, C)
    for T in (1, 2):
        dx32 = np.empty((N * L, C), np.float32)
        dw32, db32 = np.empty(C, np.float32), np.empty(C, np.float32)
        _isa.kernels.batch_norm_backward(_f32(g2), _f32(x2), dx32, N * L, C, C, False, mean,
                                         invstd, _f32(w), training, dw32, db32, T, mask)
        for level in _isa.available():
            k = _isa.load(level)
            dx16 = np.empty((N * L, C), dt)
            dw16, db16 = np.empty(C, np.float32), np.empty(C, np.float32)
            k.batch_norm_backward(g2, x2, dx16, N * L, C, C, False, mean, invstd, w, training,
                                  dw16, db16, T, mask, getattr(k, kind_name))
            _check_build(level, dt, dx16, dx32, [(dw16, dw32), (db16, db32)])


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_columns_every_kernels_build(rng, name, training):
    """(N, C) without a mask, whose rows each build reads in 16 bits four at a time: in every
    kernels build the CPU runs, with 1 and 2 threads, dx, dw and db are that build's float32
    backward of the widened arrays, to the bit (strided rows, a row count that leaves a few
    rows over in each thread)."""
    dt = half_dtype(name)
    N, C = 2003, 45
    x, g, w, b, mean, invstd = _bn_case(rng, dt, (N, C + 3), 1, "input", training)
    x, g, w, b = x[:, 1:C + 1], g[:, :C], w[:C], b[:C]
    _, mean, invstd = cynorm.batch_norm(x, None, None, w, b, True, return_stats=True)
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    for level in _isa.available():
        k = _isa.load(level)
        for T in (1, 2):
            dx32 = np.empty((N, C), np.float32)
            dw32, db32 = np.empty(C, np.float32), np.empty(C, np.float32)
            k.batch_norm_backward(_f32(g), _f32(x), dx32, N, C, C, False, mean, invstd,
                                  _f32(w), training, dw32, db32, T, None)
            dx16 = np.empty((N, C), dt)
            dw16, db16 = np.empty(C, np.float32), np.empty(C, np.float32)
            k.batch_norm_backward(g, x, dx16, N, C, C, False, mean, invstd, w, training, dw16,
                                  db16, T, None, getattr(k, kind_name))
            np.testing.assert_array_equal(dx16.view(np.uint16),
                                          dx32.astype(dt).view(np.uint16), err_msg=level)
            np.testing.assert_array_equal(dw16, dw32, err_msg=level)
            np.testing.assert_array_equal(db16, db32, err_msg=level)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_against_the_float64_reference(rng, name, training):
    """dx within one 16-bit ulp of the correctly rounded float64 gradient, but where the
    float32 arithmetic's own error (a few float32 ulps of the feature's largest term) is the
    larger; dw and db close to the float64 sums."""
    from conftest import reference_eval_backward

    dt = half_dtype(name)
    shape = (32, 12, 50)
    x, g, w, b, mean, invstd = _bn_case(rng, dt, shape, 1, "float32", training,
                                        offset_sigmas=1e3)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, bias=b)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    if training:
        rdx, rdw, rdb = reference_norm_backward(g64, x64, (0, 2), w, (12, 1))
    else:
        rdx, rdw, rdb = reference_eval_backward(g64, x64, mean, invstd, w, 1)
    big = (np.abs(g64).max(axis=(0, 2)) * invstd * w).reshape(1, -1, 1)
    u = ulps16(dx, correctly_rounded(rdx, dt))
    far = (u > 1) & (np.abs(dx.astype(np.float64) - rdx) > 2.0 ** -20 * big)
    assert not far.any(), f"{int(u.max())} ulps at {np.unravel_index(u.argmax(), u.shape)}"
    tol = 2.0 ** -18 * np.abs(g64).sum(axis=(0, 2)).max()
    np.testing.assert_allclose(dw, np.ravel(rdw), rtol=1e-5, atol=tol)
    np.testing.assert_allclose(db, np.ravel(rdb), rtol=1e-5, atol=tol)


# ---- GroupNorm and InstanceNorm (ops/group_norm_half.pxi) ----------------------------------

GN_CASES = [((4, 6, 50), 3, 1), ((2, 8, 9, 11), 2, 1), ((3, 40, 12), 4, -1),
            ((2, 7, 5, 16), 4, -1), ((5, 4, 1), 2, 1), ((2, 64, 300), 64, 1)]


def _gn_backward(g, x, mean, rstd, G, w, b, axis, fixed=False, **kw):
    """group_norm_backward, or (G None) instance_norm_backward."""
    if G is None:
        return cynorm.instance_norm_backward(g, x, mean, rstd, w, use_input_stats=not fixed,
                                             bias=b, axis=axis, **kw)
    return cynorm.group_norm_backward(g, x, mean, rstd, G, w, bias=b, axis=axis, **kw)


def _gn_forward_stats(x, G, w, b, axis, **kw):
    if G is None:
        return cynorm.instance_norm(x, weight=w, bias=b, axis=axis, return_stats=True, **kw)[1:]
    return cynorm.group_norm(x, G, w, b, axis=axis, return_stats=True, **kw)[1:]


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, G, axis", GN_CASES)
@pytest.mark.parametrize("params", ["none", "float32", "input"])
@pytest.mark.parametrize("instance", [False, True])
def test_group_norm_same_bits_as_the_float32_backward(rng, name, shape, G, axis, params,
                                                      instance):
    dt = half_dtype(name)
    C = shape[axis]
    G = None if instance else G
    x = half_data(rng, shape, dt, offset_sigmas=rng.choice([0, 30, 1e3]))
    g = half_data(rng, shape, dt, offset_sigmas=0, scale=1.0)
    w, b = _params(rng, C, params, dt)
    pp = (w, b) if params != "none" else (None, None)
    if instance and shape[2:] == (1,):
        # one spatial element: InstanceNorm only with its running statistics (eval)
        mean = rng.standard_normal((shape[0], C)) + float(x.astype(np.float64).mean())
        rstd = rng.uniform(0.1, 2.0, (shape[0], C))
    else:
        mean, rstd = _gn_forward_stats(x, G, w, b, axis)
        got = _gn_backward(g, x, mean, rstd, G, w, b, axis)
        want = _gn_backward(_f32(g), _f32(x), mean, rstd, G, _f32(w), _f32(b), axis)
        _assert_same_backward(got, want, dt, pp)
    if instance:   # the running statistics as constants (eval)
        got = _gn_backward(g, x, mean, rstd, G, w, b, axis, fixed=True)
        want = _gn_backward(_f32(g), _f32(x), mean, rstd, G, _f32(w), _f32(b), axis,
                            fixed=True)
        _assert_same_backward(got, want, dt, pp)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("instance", [False, True])
def test_group_norm_masks_and_long_samples(rng, name, axis, instance):
    """(N, C, L) and (N, L, C) with lengths (0, 1 and full among them), L long enough for
    several widened blocks: the bits of the float32 backward, padding's dx 0."""
    dt = half_dtype(name)
    N, C, L = 5, 24, 700
    shape = (N, C, L) if axis == 1 else (N, L, C)
    G = None if instance else 6
    x = half_data(rng, shape, dt, offset_sigmas=200)
    g = half_data(rng, shape, dt, offset_sigmas=0, scale=1.0)
    w, b = _params(rng, C, "float32", dt)
    lengths = np.array([L, 0, 1, rng.integers(2, L), rng.integers(2, L)])
    mean, rstd = _gn_forward_stats(x, G, w, b, axis, lengths=lengths)
    got = _gn_backward(g, x, mean, rstd, G, w, b, axis, lengths=lengths)
    want = _gn_backward(_f32(g), _f32(x), mean, rstd, G, w, b, axis, lengths=lengths)
    _assert_same_backward(got, want, dt, (w, b))
    pad = np.arange(L)[None, :] >= lengths[:, None]
    dx = got[0] if axis == -1 else np.swapaxes(got[0], 1, 2)
    assert pad.any() and not dx[pad].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("last", [False, True])
def test_group_norm_threads_and_every_kernels_build(rng, name, last):
    """The kernels called directly with 16-bit arrays: 1 and 2 threads give the same bits, and
    every build agrees with the float32 kernels (the same bits in the build the CPU runs)."""
    dt = half_dtype(name)
    N, C, S, G = 4, 32, 130, 8
    x = half_data(rng, (N, S, C) if last else (N, C, S), dt, offset_sigmas=50)
    g = half_data(rng, x.shape, dt, offset_sigmas=0, scale=1.0)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    mask = rng.random((N, S)) < 0.7
    mean, rstd = cynorm.group_norm(x, G, w, None, axis=-1 if last else 1, return_stats=True,
                                   mask=mask)[1:]
    stats = np.stack([np.repeat(mask.sum(1) * float(C // G), G), mean.ravel(), rstd.ravel()])
    kind_name = "HALF_BFLOAT16" if name == "bfloat16" else "HALF_FLOAT16"
    for fixed in (False, True):
        dx32 = np.empty(x.shape, np.float32)
        sums32 = np.empty((N, 2, C))
        dw32, db32 = np.empty(C, np.float32), np.empty(C, np.float32)
        _isa.kernels.group_norm_backward(_f32(g), _f32(x), dx32, N, C, S, G, last, stats, w,
                                         fixed, sums32, dw32, db32, mask, 2)
        for level in _isa.available():
            k = _isa.load(level)
            for T in (1, 2):
                dx = np.empty(x.shape, dt)
                sums = np.empty((N, 2, C))
                dw, db = np.empty(C, np.float32), np.empty(C, np.float32)
                k.group_norm_backward(g, x, dx, N, C, S, G, last, stats, w, fixed, sums, dw, db,
                                      mask, T, getattr(k, kind_name))
                _check_build(level, dt, dx, dx32, [(sums, sums32), (dw, dw32), (db, db32)])


def test_group_norm_rescued_samples(rng, monkeypatch):
    """A sample whose rstd lies beyond the range in which the float32 coefficients stay exact
    is redone scaled (_groups._rescue_backward), from the 16-bit g: the same result as from a
    float32 g.  (bfloat16 only: no float16 sample is spread so little, nor so much, that its
    rstd leaves that range.)"""
    from cynorm import _groups

    dt = half_dtype("bfloat16")
    x = half_data(rng, (3, 4, 64), dt, offset_sigmas=5)
    x[1] = np.asarray(1e-30, dt)
    x[1, :, ::7] = 0
    g = half_data(rng, x.shape, dt, offset_sigmas=0, scale=1.0)
    w = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    _, mean, rstd = cynorm.group_norm(x, 2, w, None, eps=0.0, return_stats=True)
    calls = []
    rescue = _groups._rescue_backward

    def spy(*args):
        calls.append(args[2].dtype)
        return rescue(*args)

    monkeypatch.setattr(_groups, "_rescue_backward", spy)
    got = cynorm.group_norm_backward(g, x, mean, rstd, 2, w, bias=w)
    want = cynorm.group_norm_backward(_f32(g), _f32(x), mean, rstd, 2, w, bias=w)
    assert calls == [dt, np.float32]
    assert np.isfinite(got[0].astype(np.float32)).all()
    assert np.abs(got[0][1].astype(np.float32)).max() > 1e20
    _assert_same_backward(got, want, dt, (w, w))
