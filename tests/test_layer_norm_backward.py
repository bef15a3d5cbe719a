import numpy as np
import pytest

import cynorm
from conftest import hostile, numeric_grad, rel_err

SHAPES = [((5, 10), (10,)), ((7, 33), (33,)), ((3, 4, 300), (300,)), ((2, 3, 5, 6), (5, 6)),
          ((64, 2100), (2100,))]


def _torch_grads(torch, x, ns, w, b, g, eps=1e-5):
    tx = torch.tensor(np.array(x), requires_grad=True)
    tw = None if w is None else torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    torch.nn.functional.layer_norm(tx, ns, tw, tb, eps).backward(torch.tensor(np.array(g)))
    return tx.grad.numpy(), None if w is None else tw.grad.numpy(), \
        None if b is None else tb.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("shape,ns", SHAPES)
def test_matches_torch_autograd(rng, torch, dtype, affine, shape, ns):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, ns).astype(dtype) if affine in ("both", "weight") else None
    b = rng.standard_normal(ns).astype(dtype) if affine in ("both", "bias") else None
    y, mean, rstd = cynorm.layer_norm(x, ns, w, b, return_stats=True)
    assert mean.shape == shape[:len(shape) - len(ns)] + (1,) * len(ns) and mean.dtype == np.float64
    dx, dw, db = cynorm.layer_norm_backward(g, x, mean, rstd, ns, w, b)
    tdx, tdw, tdb = _torch_grads(torch, x, ns, w, b, g)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert dx.dtype == dtype and rel_err(dx, tdx) <= tol
    assert (dw is None) == (w is None) and (db is None) == (b is None)
    if w is not None:
        assert dw.dtype == dtype and dw.shape == ns and rel_err(dw, tdw) <= tol
    if b is not None:
        assert rel_err(db, tdb) <= tol


def test_finite_differences(rng):
    x = rng.standard_normal((4, 6))
    w, b = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    g = rng.standard_normal((4, 6))

    def loss():
        return float(np.sum(cynorm.layer_norm(x, 6, w, b, eps=1e-3) * g))

    _, mean, rstd = cynorm.layer_norm(x, 6, w, b, eps=1e-3, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(g, x, mean, rstd, 6, w, b)
    for got, arr in ((dx, x), (dw, w), (db, b)):
        assert rel_err(got, numeric_grad(loss, arr)) <= 1e-7


def test_float32_far_from_zero_matches_float64(rng, torch):
    x = (1e4 + rng.standard_normal((32, 500))).astype(np.float32)
    g = rng.standard_normal((32, 500)).astype(np.float32)
    w = rng.uniform(0.5, 2, 500).astype(np.float32)
    b = rng.standard_normal(500).astype(np.float32)
    _, mean, rstd = cynorm.layer_norm(x, 500, w, b, return_stats=True)
    got = cynorm.layer_norm_backward(g, x, mean, rstd, 500, w, b)
    ref = _torch_grads(torch, x.astype(np.float64), (500,), w.astype(np.float64),
                       b.astype(np.float64), g.astype(np.float64))
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= 1e-4


def test_constant_rows(torch):
    x = np.full((3, 8), 2.0)
    g = np.arange(24.0).reshape(3, 8)
    w = np.linspace(0.5, 1.5, 8)
    _, mean, rstd = cynorm.layer_norm(x, 8, w, return_stats=True)
    dx, dw, _ = cynorm.layer_norm_backward(g, x, mean, rstd, 8, w)
    tdx, tdw, _ = _torch_grads(torch, x, (8,), w, None, g)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, tdx, atol=1e-9)
    np.testing.assert_allclose(dw, tdw, atol=1e-12)


def test_thread_counts(rng):
    x = hostile(rng, (600, 300), np.float32)
    g = rng.standard_normal((600, 300)).astype(np.float32)
    w, b = np.ones(300, np.float32), np.zeros(300, np.float32)
    _, mean, rstd = cynorm.layer_norm(x, 300, w, b, return_stats=True)
    with cynorm.num_threads(2):
        first = cynorm.layer_norm_backward(g, x, mean, rstd, 300, w, b)
        again = cynorm.layer_norm_backward(g, x, mean, rstd, 300, w, b)
    with cynorm.num_threads(1):
        single = cynorm.layer_norm_backward(g, x, mean, rstd, 300, w, b)
    for a, c, s in zip(first, again, single):
        np.testing.assert_array_equal(a, c)  # deterministic for a given thread count
        np.testing.assert_allclose(a, s, rtol=1e-5, atol=1e-5)  # equal to rounding across counts


def test_layouts_and_dtypes(rng, torch):
    base = rng.standard_normal((10, 24))
    g = rng.standard_normal((10, 24))
    for x in (base[:, ::-1], np.asfortranarray(base), base.astype(np.float16)):
        _, mean, rstd = cynorm.layer_norm(x, 24, return_stats=True)
        dx, _, _ = cynorm.layer_norm_backward(g[:, ::-1] if x.strides[1] < 0 else g, x, mean,
                                              rstd, 24)
        ref, _, _ = _torch_grads(torch, np.asarray(x, np.float64), (24,), None, None,
                                 g[:, ::-1] if x.strides[1] < 0 else g)
        assert dx.dtype == (np.float16 if x.dtype == np.float16 else np.float64)
        assert rel_err(dx, ref) <= (2e-3 if x.dtype == np.float16 else 1e-12)


def test_errors(rng):
    x = rng.standard_normal((4, 5))
    _, mean, rstd = cynorm.layer_norm(x, 5, return_stats=True)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        cynorm.layer_norm_backward(np.ones((4, 4)), x, mean, rstd, 5)
    with pytest.raises(ValueError, match="mean must have 4 elements"):
        cynorm.layer_norm_backward(np.ones((4, 5)), x, mean[:2], rstd, 5)
    with pytest.raises(ValueError, match="rstd is required"):
        cynorm.layer_norm_backward(np.ones((4, 5)), x, mean, None, 5)
    with pytest.raises(ValueError, match="weight"):
        cynorm.layer_norm_backward(np.ones((4, 5)), x, mean, rstd, 5, np.ones(3))
    with pytest.raises(ValueError, match="normalized_shape"):
        cynorm.layer_norm_backward(np.ones((4, 5)), x, mean, rstd, 4)


def test_saved_statistics_any_layout(rng):
    # the statistics are read as M contiguous float64 values: (M, 1), (M,), strided views and
    # 2-d reshapes of them give the same gradients; a wrong count is an error
    x = rng.standard_normal((6, 5)) * 3 + 1e3
    g = rng.standard_normal(x.shape)
    _, mean, rstd = cynorm.layer_norm(x, 5, return_stats=True)
    ref = cynorm.layer_norm_backward(g, x, mean, rstd, 5)[0]
    for m, r in ((mean.ravel(), rstd.ravel()), (mean.reshape(2, 3), rstd.reshape(3, 2)),
                 (np.repeat(mean, 2, axis=0)[::2], np.repeat(rstd, 3, axis=0)[::3])):
        np.testing.assert_array_equal(cynorm.layer_norm_backward(g, x, m, r, 5)[0], ref)
    with pytest.raises(ValueError, match="rstd must have 6 elements"):
        cynorm.layer_norm_backward(g, x, mean, np.repeat(rstd, 2, axis=1), 5)


def test_empty_batch():
    x = np.empty((0, 5))
    _, mean, rstd = cynorm.layer_norm(x, 5, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(np.empty((0, 5)), x, mean, rstd, 5, np.ones(5),
                                            np.zeros(5))
    assert dx.shape == (0, 5) and (dw == 0).all() and (db == 0).all()
