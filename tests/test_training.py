"""Layers that train: forward keeps the statistics, backward gives the gradients."""
import pickle

import numpy as np
import pytest

import cynorm
from conftest import rel_err


def test_layer_backward_matches_functions(rng):
    x = rng.standard_normal((16, 12)).astype(np.float32)
    g = rng.standard_normal((16, 12)).astype(np.float32)
    ln = cynorm.LayerNorm(12)
    ln.weight[...] = rng.uniform(0.5, 2, 12)
    ln(x)
    dx = ln.backward(g)
    _, mean, rstd = cynorm.layer_norm(x, 12, ln.weight, ln.bias, return_stats=True)
    expect = cynorm.layer_norm_backward(g, x, mean, rstd, 12, ln.weight, ln.bias)
    for a, b in zip((dx, ln.grad_weight, ln.grad_bias), expect):
        np.testing.assert_array_equal(a, b)
    bn = cynorm.BatchNorm(12, axis=-1)
    xs = rng.standard_normal((4, 7, 12)).astype(np.float32)
    bn(xs)
    dx = bn.backward(np.ones_like(xs))
    assert dx.shape == xs.shape and bn.grad_weight.shape == (12,)
    np.testing.assert_allclose(bn.grad_bias, np.full(12, 28.0))


def test_backward_needs_a_forward(rng):
    """backward without a forward is an error; after an eval forward it is that forward's
    gradient (tests/test_layers.py checks it against torch)."""
    for layer in (cynorm.LayerNorm(4), cynorm.BatchNorm1d(4)):
        with pytest.raises(RuntimeError, match="needs a forward pass first"):
            layer.backward(np.ones((3, 4)))
        layer.eval()
        layer(rng.standard_normal((3, 4)))
        assert layer.backward(np.ones((3, 4))).shape == (3, 4)


def test_layers_without_affine_have_no_parameter_gradients(rng):
    ln = cynorm.LayerNorm(5, elementwise_affine=False)
    ln(rng.standard_normal((3, 5)))
    ln.backward(np.ones((3, 5)))
    assert ln.grad_weight is None and ln.grad_bias is None
    nb = cynorm.LayerNorm(5, bias=False)
    nb(rng.standard_normal((3, 5)))
    nb.backward(np.ones((3, 5)))
    assert nb.grad_weight is not None and nb.grad_bias is None


def test_pickle_drops_the_saved_input(rng):
    ln = cynorm.LayerNorm(5)
    ln(rng.standard_normal((3, 5)))
    clone = pickle.loads(pickle.dumps(ln))
    with pytest.raises(RuntimeError):
        clone.backward(np.ones((3, 5)))


def test_matches_torch_layers_in_a_training_step(rng, torch):
    x = rng.standard_normal((32, 10)).astype(np.float32)
    g = rng.standard_normal((32, 10)).astype(np.float32)
    for ours, theirs in ((cynorm.LayerNorm(10), torch.nn.LayerNorm(10)),
                         (cynorm.BatchNorm1d(10), torch.nn.BatchNorm1d(10))):
        tx = torch.tensor(x, requires_grad=True)
        theirs(tx).backward(torch.tensor(g))
        ours(x)
        dx = ours.backward(g)
        assert rel_err(dx, tx.grad.numpy()) <= 1e-5
        assert rel_err(ours.grad_weight, theirs.weight.grad.numpy()) <= 1e-5
        assert rel_err(ours.grad_bias, theirs.bias.grad.numpy()) <= 1e-5


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_two_layer_numpy_network_learns(rng, norm):
    # y = relu(norm(x @ W1)) @ W2, squared loss, plain gradient descent.
    n, d, h = 256, 8, 32
    X = (rng.standard_normal((n, d)) * 5 + 3).astype(np.float64)
    true_w = rng.standard_normal(d)
    Y = np.tanh(X @ true_w / 10)[:, None]
    W1 = rng.standard_normal((d, h)) * 0.3
    W2 = rng.standard_normal((h, 1)) * 0.3
    layer = cynorm.LayerNorm(h, dtype=np.float64) if norm == "layer" else \
        cynorm.BatchNorm1d(h, dtype=np.float64)
    lr = 0.05
    losses = []
    for _ in range(150):
        z = X @ W1
        a = layer(z)
        r = np.maximum(a, 0)
        pred = r @ W2
        err = pred - Y
        losses.append(float(np.mean(err ** 2)))
        d_pred = 2 * err / n
        dW2 = r.T @ d_pred
        d_a = (d_pred @ W2.T) * (a > 0)
        d_z = layer.backward(d_a)
        dW1 = X.T @ d_z
        W1 -= lr * dW1
        W2 -= lr * dW2
        layer.weight -= lr * layer.grad_weight
        layer.bias -= lr * layer.grad_bias
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
    assert all(np.isfinite(losses))
