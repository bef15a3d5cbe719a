"""The front end's argument handling: the fast check for arrays the kernels read as they are
(``_kernels.plain``) and the slow paths it falls back to, which must give the same results."""
import numpy as np
import pytest

import cynorm
from cynorm import _kernels


class _Sub(np.ndarray):
    pass


def test_plain_accepts_only_what_the_kernels_read_as_is():
    f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
    a = np.zeros((3, 4))
    assert _kernels.plain(a, f64, (3, 4))
    assert _kernels.plain(a[1], f64, (4,))
    assert not _kernels.plain(a, f32, (3, 4))                       # dtype
    assert not _kernels.plain(a.astype(">f8"), f64, (3, 4))         # byte order
    assert not _kernels.plain(a, f64, (4, 3))                       # shape
    assert not _kernels.plain(a, f64, (12,))                        # ndim
    assert not _kernels.plain(a[:, ::2], f64, (3, 2))               # strides
    assert not _kernels.plain(np.asfortranarray(a), f64, (3, 4))    # order
    assert not _kernels.plain(a.tolist(), f64, (3, 4))              # not an ndarray
    assert not _kernels.plain(a.view(_Sub), f64, (3, 4))            # a subclass
    assert not _kernels.plain(None, f64, (3, 4))
    assert _kernels.plain(np.zeros(0), f64, (0,))


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
