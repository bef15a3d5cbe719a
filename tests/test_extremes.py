"""Extreme values and sizes: near the float maximum, subnormals, inf / NaN, 10^7-element rows
and 10^8-element inputs.  A finite answer where one exists, NaN where the input holds NaN or inf,
never silent zeros."""
import numpy as np
import pytest

import cynorm

F64_MAX = np.finfo(np.float64).max


def standardized(x, axes):
    """(x - mean) / std over axes in float64, computed on x scaled to unit size first."""
    x = np.asarray(x, np.float64)
    scale = np.max(np.abs(x), axis=axes, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    xs = x / scale
    d = xs - xs.mean(axis=axes, keepdims=True)
    return d / np.sqrt(np.mean(d * d, axis=axes, keepdims=True))


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e300, 1e307])
def test_layer_norm_near_the_float64_maximum(rng, scale):
    x = rng.standard_normal((6, 300)) * scale
    x[1] += 4 * scale  # an offset as well
    with np.errstate(over="ignore"):
        x[2, :] = np.clip(x[2] * 50, -F64_MAX, F64_MAX)  # elements at the top of the range
    y, mean, rstd = cynorm.layer_norm(x, 300, return_stats=True)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, standardized(x, -1), atol=1e-12)
    xs = x / scale
    np.testing.assert_allclose(mean.ravel() / scale, xs.mean(-1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rstd.ravel() * scale, 1 / xs.std(-1), rtol=1e-12)


def test_batch_norm_near_the_float64_maximum_feature_by_feature(rng):
    # feature 0 ordinary, 1 and 2 huge (their variance is beyond float64), 3 large but fine
    x = rng.standard_normal((500, 4))
    x[:, 1] = x[:, 1] * 1e300 + 2e300
    x[:, 2] *= 1e250
    x[:, 3] *= 1e150
    rm, rv = np.zeros(4), np.ones(4)
    y, mean, invstd = cynorm.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-300,
                                        return_stats=True)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, standardized(x, 0), atol=1e-12)
    scale = np.array([1.0, 1e300, 1e250, 1e150])
    xs = x / scale
    np.testing.assert_allclose(mean / scale, xs.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(invstd * scale, 1 / xs.std(0), rtol=1e-12)
    np.testing.assert_allclose(rm / scale, xs.mean(0), rtol=1e-12, atol=1e-13)
    # the running variance where float64 holds it; inf (not NaN, not a wrap-around) where not
    np.testing.assert_allclose(rv[[0, 3]] / scale[[0, 3]] ** 2, xs.var(0, ddof=1)[[0, 3]],
                               rtol=1e-12)
    assert np.isposinf(rv[[1, 2]]).all()
    m = cynorm.moments(x, 0)
    np.testing.assert_allclose(m.mean / scale, xs.mean(0), rtol=1e-12, atol=1e-13)
    assert np.isposinf(m.var()[[1, 2]]).all() and np.isfinite(m.var()[[0, 3]]).all()


def test_alternating_extremes():
    x = np.full((3, 8), F64_MAX)
    x[:, ::2] = -F64_MAX
    np.testing.assert_array_equal(cynorm.layer_norm(x, 8), np.where(x > 0, 1.0, -1.0))
    np.testing.assert_array_equal(cynorm.batch_norm(x.T.copy(), training=True),
                                  np.where(x.T > 0, 1.0, -1.0))


def test_float32_near_its_maximum(rng):
    x = (rng.uniform(-1, 1, (5, 64)) * 3.3e38).astype(np.float32)
    np.testing.assert_allclose(cynorm.layer_norm(x, 64), standardized(x, -1), atol=1e-5)
    np.testing.assert_allclose(cynorm.batch_norm(x.T.copy(), training=True),
                               standardized(x.T, 0), atol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_poison_only_their_row_or_feature(rng, bad):
    x = rng.standard_normal((6, 5)) * 1e200
    x[2, 3] = bad
    y = cynorm.layer_norm(x, 5)
    assert np.isnan(y[2]).all()
    np.testing.assert_allclose(np.delete(y, 2, 0), standardized(np.delete(x, 2, 0), -1),
                               atol=1e-12)
    yb = cynorm.batch_norm(x, training=True)
    assert np.isnan(yb[:, 3]).all()
    np.testing.assert_allclose(np.delete(yb, 3, 1), standardized(np.delete(x, 3, 1), 0),
                               atol=1e-12)


@pytest.mark.parametrize("dtype,scale", [(np.float64, 1e-310), (np.float64, 1e-300),
                                         (np.float32, 1e-42), (np.float32, 1e-30)])
def test_subnormals(rng, dtype, scale):
    x = (rng.standard_normal((4, 64)) * scale).astype(dtype)
    x64 = x.astype(np.float64)
    # the mean itself is a subnormal of the input dtype: off by up to its spacing, which
    # 1 / sqrt(eps) magnifies
    spacing = 4 * np.finfo(dtype).smallest_subnormal / np.sqrt(1e-5)
    # with eps the variance is negligible: y = (x - mean) / sqrt(var + eps), tiny
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(cynorm.layer_norm(x, 64), want,
                               atol=max(1e-6 * np.abs(want).max(), spacing))
    wantb = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(cynorm.batch_norm(x, training=True), wantb,
                               atol=max(1e-6 * np.abs(wantb).max(), spacing))
    # eps=0: the standardized row, although the squares underflow float64
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(cynorm.layer_norm(x, 64, eps=0.0), standardized(x, -1), atol=tol)


def test_constant_and_zero_rows_with_eps_zero_match_torch(torch):
    x = np.array([[7.0] * 8, [0.0] * 8, [1e-310] * 8, [1e300] * 8])
    want = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), eps=0.0).numpy()
    np.testing.assert_array_equal(cynorm.layer_norm(x, 8, eps=0.0), want)
    # with eps: beta, no NaN
    np.testing.assert_array_equal(cynorm.layer_norm(x, 8, bias=np.full(8, 0.5)), 0.5)


def test_a_row_of_ten_million(rng):
    x = rng.standard_normal((1, 10**7), dtype=np.float32) * 3 + 1e3
    y, mean, rstd = cynorm.layer_norm(x, 10**7, return_stats=True)
    x64 = x.astype(np.float64)
    m = x64.mean()
    d = x64 - m
    m += d.mean()
    d = x64 - m
    v = np.mean(d * d)
    assert abs(mean.item() - m) <= 1e-12 * abs(m)
    assert abs(rstd.item() * np.sqrt(v + 1e-5) - 1) <= 1e-12
    assert np.max(np.abs(y - d / np.sqrt(v + 1e-5))) <= 1e-5
    mo = cynorm.moments(x, None)
    np.testing.assert_allclose(mo.var(), v, rtol=1e-12)


@pytest.mark.parametrize("shape,op", [((100_000, 1000), "bn"), ((10, 100, 100_000), "bn"),
                                      ((10_000, 10_000), "ln")])
def test_ten_to_the_eight_elements(rng, shape, op):
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 2
    x += 50
    if op == "ln":
        y, mean, rstd = cynorm.layer_norm(x, shape[-1], return_stats=True)
        rows = rng.choice(shape[0], 20, replace=False)
        sample = x[rows].astype(np.float64)
        m = sample.mean(-1, keepdims=True)
        v = ((sample - m) ** 2).mean(-1, keepdims=True)
        assert np.max(np.abs(y[rows] - (sample - m) / np.sqrt(v + 1e-5))) <= 1e-5
        return
    y, mean, invstd = cynorm.batch_norm(x, training=True, return_stats=True)
    # float64 statistics one feature-slab at a time (the reference never holds 10^8 doubles)
    axes = (0,) if x.ndim == 2 else (0, 2)
    feats = rng.choice(shape[1], 8, replace=False)
    for c in feats:
        col = (x[:, c] if x.ndim == 2 else x[:, c, :]).astype(np.float64)
        m = col.mean()
        v = ((col - m) ** 2).mean()
        assert abs(mean[c] - m) <= 1e-12 * abs(m)
        # (N, C): float32 rows summed in float32 groups of 16 (M2 to ~1e-7; no growth with N)
        assert abs(invstd[c] * np.sqrt(v + 1e-5) - 1) <= (1e-7 if x.ndim == 2 else 1e-11)
        yc = y[:, c] if x.ndim == 2 else y[:, c, :]
        assert np.max(np.abs(yc - (col - m) / np.sqrt(v + 1e-5))) <= 1e-5
    assert axes  # the layout under test: (N, C) column path, (N, C, L) row path
