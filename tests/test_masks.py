"""Padding masks: statistics over real tokens only, padding written as 0, skipped in place."""
import numpy as np
import pytest

import cynorm
from conftest import TOL, hostile, max_err, rel_err


def _batch(rng, N=6, T=9, C=5, dtype=np.float64, lengths=None, offset=None):
    x = hostile(rng, (N, T, C), dtype, offset=offset)
    if lengths is None:
        lengths = rng.integers(0, T + 1, N)
        lengths[0] = T  # at least one full sequence
    mask = np.arange(T) < np.asarray(lengths)[:, None]
    x[~mask] = rng.standard_normal((int((~mask).sum()), C)) * 1e3  # garbage in the padding
    return x, np.asarray(lengths), mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_equals_batch_norm_of_the_real_tokens(rng, ref_batch_norm, torch, dtype):
    x, lengths, mask = _batch(rng, dtype=dtype)
    real = x[mask]
    C = x.shape[-1]
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y = cynorm.batch_norm(x, rm, rv, w, b, training=True, axis=-1, mask=mask)
    assert max_err(y[mask], ref_batch_norm(real, 1, w, b)) <= 4 * TOL[np.dtype(dtype)]
    assert (y[~mask] == 0).all()
    # torch on the concatenation of the real tokens (mild data: torch's float32 is not accurate
    # far from zero)
    x, lengths, mask = _batch(rng, dtype=dtype, offset=0.0)
    real = x[mask]
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y = cynorm.batch_norm(x, rm, rv, w, b, training=True, axis=-1, mask=mask)
    trm = torch.zeros(C, dtype=torch.from_numpy(x).dtype)
    trv = torch.ones(C, dtype=torch.from_numpy(x).dtype)
    expect = torch.nn.functional.batch_norm(torch.from_numpy(real), trm, trv, torch.from_numpy(w),
                                            torch.from_numpy(b), training=True).numpy()
    np.testing.assert_allclose(y[mask], expect, atol=1e-4 if dtype == np.float32 else 1e-10)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5)
    # eval: real tokens normalized by the running statistics, padding 0
    y_eval = cynorm.batch_norm(x, rm, rv, w, b, training=False, axis=-1, lengths=lengths)
    ref = ref_batch_norm(real, 1, w, b, mean=rm.astype(np.float64), var=rv)
    assert max_err(y_eval[mask], ref) <= 1e-4 * np.abs(ref).max()
    assert (y_eval[~mask] == 0).all()


@pytest.mark.parametrize("op", ["layer_norm", "batch_norm training", "batch_norm eval"])
@pytest.mark.parametrize("shape", [(6, 9, 5), (16, 128, 64), (8, 256, 300)])
def test_fresh_outputs_get_zeros_in_the_padding(rng, op, shape):
    # whatever memory a fresh output comes from, its padding rows hold zeros: memory of that
    # size filled with NaN and freed first, for the output to reuse
    x, lengths, mask = _batch(rng, *shape, dtype=np.float32)
    C = shape[-1]
    call = {"layer_norm": lambda: cynorm.layer_norm(x, C, lengths=lengths),
            "batch_norm training": lambda: cynorm.batch_norm(x, training=True, axis=-1,
                                                             lengths=lengths),
            "batch_norm eval": lambda: cynorm.batch_norm(x, np.zeros(C, np.float32),
                                                         np.ones(C, np.float32), axis=-1,
                                                         lengths=lengths)}[op]
    for _ in range(3):
        junk = [np.full(x.shape, np.nan, np.float32) for _ in range(4)]
        del junk
        y = call()
        assert (y[~mask] == 0).all() and np.isfinite(y[mask]).all()


def test_lengths_and_mask_agree(rng):
    x, lengths, mask = _batch(rng)
    for fn in (lambda **k: cynorm.batch_norm(x, training=True, axis=-1, **k),
               lambda **k: cynorm.layer_norm(x, 5, **k)):
        np.testing.assert_array_equal(fn(mask=mask), fn(lengths=lengths))


def test_no_padding_is_the_plain_call(rng):
    x = hostile(rng, (4, 6, 3), np.float32)
    full = np.ones((4, 6), bool)
    np.testing.assert_array_equal(cynorm.batch_norm(x, training=True, axis=-1, mask=full),
                                  cynorm.batch_norm(x, training=True, axis=-1))
    np.testing.assert_array_equal(cynorm.layer_norm(x, 3, mask=full), cynorm.layer_norm(x, 3))


def test_layer_norm_skips_padding_rows(rng):
    x, lengths, mask = _batch(rng, T=12, C=40)
    y, mean, rstd = cynorm.layer_norm(x, 40, mask=mask, return_stats=True)
    np.testing.assert_array_equal(y[mask], cynorm.layer_norm(x[mask], 40))
    assert (y[~mask] == 0).all()
    assert np.isnan(mean[~mask]).all() and np.isfinite(mean[mask]).all()
    # backward: padding rows get 0 and add nothing to the parameter gradients
    g = rng.standard_normal(x.shape)
    w, b = rng.uniform(0.5, 2, 40), rng.standard_normal(40)
    y, mean, rstd = cynorm.layer_norm(x, 40, w, b, mask=mask, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(g, x, mean, rstd, 40, w, b, mask=mask)
    _, m2, r2 = cynorm.layer_norm(x[mask], 40, w, b, return_stats=True)
    ref = cynorm.layer_norm_backward(g[mask], x[mask], m2, r2, 40, w, b)
    assert (dx[~mask] == 0).all()
    for a, r in zip((dx[mask], dw, db), ref):
        assert rel_err(a, r) <= 1e-12


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_backward_equals_torch_on_the_real_tokens(rng, torch, dtype, training):
    x, lengths, mask = _batch(rng, N=5, T=11, C=4, dtype=dtype, offset=0.0)
    real = x[mask]
    g = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, 4).astype(dtype), rng.standard_normal(4).astype(dtype)
    rm, rv = rng.standard_normal(4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    _, mean, invstd = cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training, axis=-1,
                                        mask=mask, return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=-1, bias=b,
                                            mask=mask)
    tx = torch.tensor(real, requires_grad=True)
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch.nn.functional.batch_norm(tx, torch.tensor(rm), torch.tensor(rv), tw, tb,
                                   training).backward(torch.tensor(g[mask]))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert (dx[~mask] == 0).all()
    for a, r in ((dx[mask], tx.grad), (dw, tw.grad), (db, tb.grad)):
        assert rel_err(a, r.numpy()) <= tol


def test_layers_with_masks(rng):
    x, lengths, mask = _batch(rng, C=6)
    bn = cynorm.BatchNorm(6, axis=-1, dtype=np.float64)
    y = bn(x, lengths=lengths)
    assert (y[~mask] == 0).all() and int(bn.num_batches_tracked) == 1
    dx = bn.backward(np.ones_like(x))
    assert (dx[~mask] == 0).all()
    np.testing.assert_allclose(bn.grad_bias, np.full(6, mask.sum()))
    ln = cynorm.LayerNorm(6, dtype=np.float64)
    ln(x, mask=mask)
    dx = ln.backward(np.ones_like(x))
    assert (dx[~mask] == 0).all()
    np.testing.assert_allclose(ln.grad_bias, np.full(6, mask.sum()))


def test_edge_cases(rng):
    x = hostile(rng, (3, 5, 4), np.float64)
    # one sequence entirely padding, one of length 1
    lengths = np.array([5, 0, 1])
    y = cynorm.batch_norm(x, training=True, axis=-1, lengths=lengths)
    mask = np.arange(5) < lengths[:, None]
    assert (y[~mask] == 0).all() and np.isfinite(y).all()
    # every token padding: training is a clear error, eval writes zeros
    none = np.zeros((3, 5), bool)
    rm, rv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match="got 0 real tokens"):
        cynorm.batch_norm(x, rm, rv, training=True, axis=-1, mask=none)
    assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match="got 1 real token "):
        cynorm.batch_norm(x, training=True, axis=-1, lengths=np.array([1, 0, 0]))
    assert (cynorm.batch_norm(x, rm, rv, axis=-1, mask=none) == 0).all()
    assert (cynorm.layer_norm(x, 4, mask=none) == 0).all()


def test_invalid_masks(rng):
    x = rng.standard_normal((3, 5, 4))
    with pytest.raises(ValueError, match="batch shape"):
        cynorm.batch_norm(x, training=True, axis=-1, mask=np.ones((3, 4), bool))
    with pytest.raises(TypeError, match="bool"):
        cynorm.layer_norm(x, 4, mask=np.ones((3, 5), int))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        cynorm.layer_norm(x, 4, lengths=np.array([1, 6, 2]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\]"):
        cynorm.batch_norm(x, training=True, axis=-1, lengths=np.array([1, -1, 2]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
        cynorm.layer_norm(x, 4, lengths=np.array([1, 2]))
    with pytest.raises(TypeError, match="integer"):
        cynorm.layer_norm(x, 4, lengths=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="not both"):
        cynorm.layer_norm(x, 4, mask=np.ones((3, 5), bool), lengths=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="last axis"):
        cynorm.batch_norm(x, training=True, axis=1, mask=np.ones((3, 4), bool))
    with pytest.raises(ValueError, match=r"\(N, T, \.\.\.\)"):
        cynorm.layer_norm(x, (5, 4), lengths=np.array([1, 2, 3]))


@pytest.mark.parametrize("op", ["bn", "ln"])
def test_thread_invariance_with_masks(rng, op):
    x = hostile(rng, (64, 200, 48), np.float32)
    lengths = rng.integers(1, 201, 64)
    run = (lambda: cynorm.batch_norm(x, training=True, axis=-1, lengths=lengths)) if op == "bn" \
        else (lambda: cynorm.layer_norm(x, 48, lengths=lengths))
    with cynorm.num_threads(2):
        a = run()
    with cynorm.num_threads(1):
        b = run()
    np.testing.assert_allclose(a, b, atol=2e-6)
