import numpy as np
import pytest

import cynorm
from conftest import (hostile, numeric_grad, reference_eval_backward, reference_norm_backward,
                      rel_err)

LAYOUTS = [((5, 10), 1), ((300, 7), 1), ((64, 8, 5), 1), ((8, 4, 100), 1), ((4, 3, 9, 11), 1),
           ((6, 20, 12), -1), ((5, 6, 7, 3), 2)]


def _torch_grads(torch, x, axis, w, b, g, training, rm=None, rv=None, eps=1e-5):
    axis = axis % x.ndim
    tx = torch.tensor(np.array(x), requires_grad=True)
    tw = None if w is None else torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    trm = None if rm is None else torch.tensor(rm)
    trv = None if rv is None else torch.tensor(rv)
    y = torch.nn.functional.batch_norm(tx.movedim(axis, 1), trm, trv, tw, tb, training, 0.1, eps)
    y.movedim(1, axis).backward(torch.tensor(np.array(g)))
    return tx.grad.numpy(), None if w is None else tw.grad.numpy(), \
        None if b is None else tb.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_matches_torch_autograd(rng, torch, dtype, training, shape, axis):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    _, mean, invstd = cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training, axis=axis,
                                        return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=axis, bias=b)
    ref = _torch_grads(torch, x, axis, w, b, g, training, rm, rv)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for got, r in zip((dx, dw, db), ref):
        assert got.dtype == dtype and rel_err(got, r) <= tol


def test_weight_and_bias_optional(rng, torch):
    x, g = rng.standard_normal((40, 3)), rng.standard_normal((40, 3))
    _, mean, invstd = cynorm.batch_norm(x, training=True, return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd)
    assert dw is None and db is None
    assert rel_err(dx, _torch_grads(torch, x, 1, None, None, g, True)[0]) <= 1e-12
    # eval without weight: dx = g * invstd
    rm, rv = np.zeros(3), np.full(3, 4.0)
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, return_stats=True)
    dx, _, _ = cynorm.batch_norm_backward(g, x, mean, invstd, training=False)
    np.testing.assert_allclose(dx, g / np.sqrt(4.0 + 1e-5), rtol=1e-14)


@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((3, 2, 70), 1), ((3, 5, 2), -1)])
def test_finite_differences(rng, shape, axis):
    C = shape[axis]
    x = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    g = rng.standard_normal(shape)

    def loss():
        return float(np.sum(cynorm.batch_norm(x, None, None, w, b, True, eps=1e-3, axis=axis) * g))

    _, mean, invstd = cynorm.batch_norm(x, None, None, w, b, True, eps=1e-3, axis=axis,
                                        return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, True, axis=axis, bias=b)
    for got, arr in ((dx, x), (dw, w), (db, b)):
        assert rel_err(got, numeric_grad(loss, arr)) <= 1e-6


@pytest.mark.parametrize("shape,axis", [((2000, 16), 1), ((16, 8, 300), 1), ((16, 50, 24), -1)])
def test_float32_far_from_zero_matches_float64(rng, torch, shape, axis):
    C = shape[axis]
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    _, mean, invstd = cynorm.batch_norm(x, None, None, w, b, True, axis=axis, return_stats=True)
    got = cynorm.batch_norm_backward(g, x, mean, invstd, w, True, axis=axis, bias=b)
    ref = _torch_grads(torch, x.astype(np.float64), axis, w.astype(np.float64),
                       b.astype(np.float64), g.astype(np.float64), True)
    for a, r in zip(got, ref):
        assert rel_err(a, r) <= 1e-4


def test_constant_feature(rng, torch):
    x = rng.standard_normal((30, 4))
    x[:, 1] = 5.0
    g = rng.standard_normal((30, 4))
    _, mean, invstd = cynorm.batch_norm(x, training=True, return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, np.ones(4), bias=np.zeros(4))
    ref = _torch_grads(torch, x, 1, np.ones(4), np.zeros(4), g, True)
    assert np.isfinite(dx).all()
    for a, r in zip((dx, dw, db), ref):
        np.testing.assert_allclose(a, r, atol=1e-9)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((40000, 8), 1), ((32, 8, 600), 1), ((64, 80, 48), -1),
                                        ((4099, 37), 1)])
def test_thread_counts(rng, shape, axis, training):
    x = hostile(rng, shape, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), np.zeros(C, np.float32)
    rm, rv = np.full(C, x.mean(), np.float32), np.full(C, x.var(), np.float32)
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, w, b, training, axis=axis, return_stats=True)
    run = lambda: cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=axis,  # noqa: E731
                                             bias=b)
    with cynorm.num_threads(2):
        first, again = run(), run()
    with cynorm.num_threads(1):
        single = run()
    for a, c, s in zip(first, again, single):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_allclose(a, s, rtol=1e-4, atol=1e-5)
    if not training:
        # eval, the statistics are constants: dx = g·w·invstd, against float64
        ref = reference_eval_backward(g, x, mean, invstd, w, axis)
        for a, r in zip(first, ref):
            assert rel_err(a, r) <= 1e-5


def test_empty_batch():
    x = np.empty((0, 4))
    _, mean, invstd = cynorm.batch_norm(x, np.zeros(4), np.full(4, 4.0), return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(np.empty((0, 4)), x, mean, invstd, np.ones(4),
                                            False, bias=np.zeros(4))
    assert dx.shape == (0, 4)
    for a in (dw, db):
        assert a.shape == (4,) and a.dtype == np.float64 and (a == 0).all()


@pytest.mark.parametrize("training", [True, False])
def test_float16_in_float16_out(rng, training):
    x = (rng.standard_normal((64, 6)) * 2 + 3).astype(np.float16)
    g = rng.standard_normal((64, 6)).astype(np.float16)
    w, b = rng.uniform(0.5, 2, 6).astype(np.float16), rng.standard_normal(6).astype(np.float16)
    rm, rv = np.full(6, 3.0, np.float32), np.full(6, 4.0, np.float32)
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, w, b, training, return_stats=True)
    got = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, bias=b)
    x64, g64, w64 = (a.astype(np.float64) for a in (x, g, w))
    _, m64, i64 = cynorm.batch_norm(x64, rm.astype(np.float64), rv.astype(np.float64), w64,
                                    b.astype(np.float64), training, return_stats=True)
    ref = cynorm.batch_norm_backward(g64, x64, m64, i64, w64, training, bias=b)
    for a, r in zip(got, ref):
        assert a.dtype == np.float16 and rel_err(a, r) <= 2e-3


def test_errors(rng):
    x = rng.standard_normal((6, 3))
    _, mean, invstd = cynorm.batch_norm(x, training=True, return_stats=True)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        cynorm.batch_norm_backward(np.ones((3, 6)), x, mean, invstd)
    with pytest.raises(ValueError, match="invstd must have 3 elements"):
        cynorm.batch_norm_backward(np.ones((6, 3)), x, mean, invstd[:1])
    with pytest.raises(ValueError, match="weight"):
        cynorm.batch_norm_backward(np.ones((6, 3)), x, mean, invstd, np.ones(4))
    with pytest.raises(TypeError, match="grad_out"):
        cynorm.batch_norm_backward(np.ones((6, 3), complex), x, mean, invstd)


@pytest.mark.parametrize("dtype,shape", [(np.float32, (12, 64, 8192)), (np.float64, (6, 42, 8192))])
def test_training_by_feature_groups(rng, dtype, shape):
    # g and x of 24 MiB and more, (N, C, L) with long L: training's backward takes the features
    # a cache-sized group at a time (pyx/ops/batch_norm_backward.pxi, GROUP_BYTES in pyx/policy.h; here 5 features a group,
    # the last group shorter), sums then dx.  Against float64, on 1 and 2 threads.
    x = hostile(rng, shape, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    w = rng.uniform(0.5, 2, C).astype(dtype)
    _, mean, invstd = cynorm.batch_norm(x, None, None, w, None, True, return_stats=True)
    ref = reference_norm_backward(g, x, (0, 2), w, (C, 1))
    for threads in (1, 2):
        with cynorm.num_threads(threads):
            dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, True, bias=w)
        tol = 1e-4 if dtype == np.float32 else 1e-10
        assert rel_err(dx, ref[0]) <= tol
        assert rel_err(dw, ref[1]) <= tol and rel_err(db, ref[2]) <= tol
