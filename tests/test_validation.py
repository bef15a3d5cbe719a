"""The front end's argument handling: the fast check for arrays the kernels read as they are
(``_runtime.plain``) and the slow paths it falls back to, which must give the same results."""
import numpy as np
import pytest

import cynorm
from cynorm import _runtime


class _Sub(np.ndarray):
    pass


def test_plain_accepts_only_what_the_kernels_read_as_is():
    f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
    a = np.zeros((3, 4))
    assert _runtime.plain(a, f64, (3, 4))
    assert _runtime.plain(a[1], f64, (4,))
    assert not _runtime.plain(a, f32, (3, 4))                       # dtype
    assert not _runtime.plain(a.astype(">f8"), f64, (3, 4))         # byte order
    assert not _runtime.plain(a, f64, (4, 3))                       # shape
    assert not _runtime.plain(a, f64, (12,))                        # ndim
    assert not _runtime.plain(a[:, ::2], f64, (3, 2))               # strides
    assert not _runtime.plain(np.asfortranarray(a), f64, (3, 4))    # order
    assert not _runtime.plain(a.tolist(), f64, (3, 4))              # not an ndarray
    assert not _runtime.plain(a.view(_Sub), f64, (3, 4))            # a subclass
    assert not _runtime.plain(None, f64, (3, 4))
    assert _runtime.plain(np.zeros(0), f64, (0,))


def test_layer_norm_shape_takes_only_the_usual_call():
    """The fast check of LayerNorm inputs: (dtype, normalized_shape, rows, cols) for an
    ndarray of exactly float32 / float64 / float16 (bfloat16 once noted) normalized over its
    last dim, None for everything else (which the general checks then take, or refuse)."""
    f64, f32, f16 = np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16)
    a = np.zeros((3, 4, 5))
    assert _runtime.layer_norm_shape(a, 5) == (f64, (5,), 12, 5)
    assert _runtime.layer_norm_shape(a.astype(f16), 5) == (f16, (5,), 12, 5)
    assert _runtime.layer_norm_shape(a, (5,)) == (f64, (5,), 12, 5)
    assert _runtime.layer_norm_shape(a.astype(f32)[:, ::2], 5) == (f32, (5,), 6, 5)
    assert _runtime.layer_norm_shape(a, 5)[0] is f64
    for x, n in [(a, 4), (a, -5), (a, (4, 5)), (a, (5.0,)), (a, 5.0), (a, True),
                 (a, np.int64(5)), (a, 2 ** 70), (a, [5]), (a, "5"), (a, ()),
                 (a.astype(">f8"), 5), (a.astype(">f2"), 5), (a.astype(int), 5),
                 (a.view(_Sub), 5), (a.tolist(), 5), (np.zeros(()), 1), (np.zeros((3, 0)), 0)]:
        assert _runtime.layer_norm_shape(x, n) is None, (getattr(x, "dtype", x), n)


@pytest.mark.parametrize("n", [np.int64(5), [5], (np.int32(5),)])
def test_layer_norm_slow_path_gives_the_same(rng, n):
    x = (rng.standard_normal((6, 5)) * 3 + 2).astype(np.float32)
    y, mean, rstd = cynorm.layer_norm(x, 5, return_stats=True)
    y2, mean2, rstd2 = cynorm.layer_norm(x, n, return_stats=True)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(rstd, rstd2)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = np.ones(5, np.float32)
    for a, b in zip(cynorm.layer_norm_backward(g, x, mean, rstd, 5, w, w),
                    cynorm.layer_norm_backward(g, x, mean, rstd, n, w, w)):
        np.testing.assert_array_equal(a, b)


def test_layer_norm_shape_errors_unchanged():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"normalized_shape=\[5\]"):
        cynorm.layer_norm(x, 5)
    with pytest.raises(ValueError, match="must not be negative"):
        cynorm.layer_norm(x, -4)
    with pytest.raises(TypeError, match="normalized_shape"):
        cynorm.layer_norm(x, 4.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        cynorm.layer_norm(x, 2 ** 70)
    with pytest.raises(ValueError, match="normalized_shape"):
        cynorm.layer_norm_backward(x, x, np.zeros(3), np.ones(3), 2 ** 70)


def test_grad_outputs():
    f32 = np.dtype(np.float32)
    x = np.zeros((2, 3, 4), np.int16)[:, ::2]
    dx, gw, gb = _runtime.grad_outputs(x, f32, (3, 4), True, False)
    assert dx.shape == (2, 2, 4) and dx.dtype is f32 and dx.flags.c_contiguous
    assert dx.flags.writeable and dx.flags.owndata
    assert gw.shape == (3, 4) and gw.dtype is f32 and gw.flags.c_contiguous and gb is None
    dx, gw, gb = _runtime.grad_outputs(x, f32, (4,), False, True)
    assert gw is None and gb.shape == (4,)
    _, gw, gb = _runtime.grad_outputs(x, f32, (4,), True, True)
    assert not np.may_share_memory(gw, gb)


def _layouts(values):
    """The same values as a plain array and in layouts the fast check refuses."""
    n = values.size
    strided = np.empty(2 * n, values.dtype)[::2]
    strided[...] = values
    wider = np.float64 if values.dtype == np.float32 else np.longdouble  # exact conversions
    return [values, values.astype(values.dtype.newbyteorder()), strided, values.tolist(),
            values.astype(wider)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_parameters_in_any_layout(rng, dtype):
    x = (rng.standard_normal((40, 6)) * 3 + 2).astype(dtype)
    w, b = rng.uniform(0.5, 2, 6).astype(dtype), rng.standard_normal(6).astype(dtype)
    rm, rv = rng.standard_normal(6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    ln = cynorm.layer_norm(x, 6, w, b)
    bn = cynorm.batch_norm(x, rm, rv, w, b)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for w2, b2, rm2, rv2 in zip(_layouts(w), _layouts(b), _layouts(rm),
                                _layouts(rv)):
        np.testing.assert_allclose(cynorm.layer_norm(x, 6, w2, b2), ln, rtol=tol, atol=tol)
        got = cynorm.batch_norm(x, rm2, rv2, w2, b2)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, bn, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_arguments_in_any_layout(rng, dtype):
    x = (rng.standard_normal((30, 5)) * 2 + 1).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, 5).astype(dtype), rng.standard_normal(5).astype(dtype)
    _, lm, lr = cynorm.layer_norm(x, 5, w, b, return_stats=True)
    _, bm, bi = cynorm.batch_norm(x, None, None, w, b, True, return_stats=True)
    ln = cynorm.layer_norm_backward(g, x, lm, lr, 5, w, b)
    bn = cynorm.batch_norm_backward(g, x, bm, bi, w, bias=b)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    g_strided = np.empty((30, 10), dtype)[:, ::2]
    g_strided[...] = g
    for g2 in (g_strided, g.astype(g.dtype.newbyteorder()), g.tolist()):
        # saved statistics as (rows,), (rows, 1) and lists: one value per row or feature
        for lm2, lr2 in ((lm.ravel(), lr.ravel()), (lm, lr), (lm.tolist(), lr.tolist())):
            for got, ref in zip(cynorm.layer_norm_backward(g2, x, lm2, lr2, 5, w, b), ln):
                assert got.dtype == dtype
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
        for got, ref in zip(cynorm.batch_norm_backward(g2, x, bm.tolist(), bi[::-1][::-1],
                                                       w.tolist(), bias=b), bn):
            assert got.dtype == dtype
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


def test_read_only_saved_statistics(rng):
    # backward only reads what the forward saved: read-only arrays (a memory map opened for
    # reading, a frozen cache) are accepted, and give the same gradients
    x = rng.standard_normal((12, 7))
    g = rng.standard_normal(x.shape)
    _, lm, lr = cynorm.layer_norm(x, 7, return_stats=True)
    _, bm, bi = cynorm.batch_norm(x, None, None, training=True, return_stats=True)
    ln = cynorm.layer_norm_backward(g, x, lm, lr, 7)
    bn = cynorm.batch_norm_backward(g, x, bm, bi)
    for a in (lm, lr, bm, bi):
        a.flags.writeable = False
    np.testing.assert_array_equal(cynorm.layer_norm_backward(g, x, lm, lr, 7)[0], ln[0])
    np.testing.assert_array_equal(cynorm.layer_norm_backward(g, x, lm.ravel(), lr.ravel(), 7)[0],
                                  ln[0])
    np.testing.assert_array_equal(cynorm.batch_norm_backward(g, x, bm, bi)[0], bn[0])
    assert not bm.flags.writeable and not lm.flags.writeable   # left as they were
