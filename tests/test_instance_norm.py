"""InstanceNorm: instance_norm, instance_norm_backward and InstanceNorm1d/2d/3d, against the
float64 reference and torch (F.instance_norm, the modules over several steps, autograd)."""
import warnings

import numpy as np
import pytest

import cynorm
from conftest import (TOL, hostile, max_err, numeric_grad, reference_group_backward,
                      reference_group_norm)

DTYPES = [np.float32, np.float64]
SHAPES = [(4, 3, 5), (2, 8, 7, 5), (3, 2, 3000), (1, 5, 2, 3, 4), (2, 64, 56)]


def channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape", SHAPES)
def test_accuracy_against_float64_reference(rng, dtype, offset, shape):
    x = hostile(rng, shape, dtype, offset=offset)
    C = shape[1]
    w = rng.uniform(-2, 2, C).astype(dtype)
    b = rng.uniform(-2, 2, C).astype(dtype)
    ref, ref_mean, ref_rstd = reference_group_norm(x, C, w, b)
    y, mean, rstd = cynorm.instance_norm(x, weight=w, bias=b, return_stats=True)
    assert y.dtype == dtype and max_err(y, ref) <= TOL[np.dtype(dtype)]
    assert mean.shape == (shape[0], C)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-15, atol=1e-15 * np.abs(x).max())
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-6 if dtype == np.float32 else 1e-12)
    yl = cynorm.instance_norm(channels_last(x), weight=w, bias=b, axis=-1)
    assert max_err(yl, channels_last(ref)) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_functional_with_running_stats_matches_torch(rng, torch, dtype, axis):
    F = torch.nn.functional
    C = 4
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm_t, rv_t = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    for step in range(4):
        x = (rng.standard_normal((3, C, 6, 5)) * (step + 1) + step).astype(dtype)
        xt = torch.from_numpy(x.astype(np.float64))
        expect = F.instance_norm(xt, rm_t, rv_t, torch.from_numpy(w).double(),
                                 torch.from_numpy(b).double(), True, 0.2, 1e-5).numpy()
        xa = x if axis == 1 else channels_last(x)
        y = cynorm.instance_norm(xa, rm, rv, w, b, True, 0.2, axis=axis)
        if axis == -1:
            y = np.moveaxis(y, -1, 1)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        assert max_err(y, expect) <= tol
        np.testing.assert_allclose(rm, rm_t.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(rv, rv_t.numpy(), rtol=tol, atol=tol)
    # eval: the running statistics normalize
    x = (rng.standard_normal((2, C, 7, 3)) + 1).astype(dtype)
    expect = F.instance_norm(torch.from_numpy(x.astype(np.float64)), rm_t, rv_t,
                             torch.from_numpy(w).double(), torch.from_numpy(b).double(),
                             False).numpy()
    xa = x if axis == 1 else channels_last(x)
    y, mean, rstd = cynorm.instance_norm(xa, rm, rv, w, b, False, axis=axis, return_stats=True)
    assert max_err(y if axis == 1 else np.moveaxis(y, -1, 1), expect) <= TOL[np.dtype(dtype)]
    np.testing.assert_allclose(mean, np.tile(rm, (2, 1)))
    # momentum=None leaves them alone (torch 2.13)
    before = rm.copy(), rv.copy()
    cynorm.instance_norm(xa, rm, rv, momentum=None, axis=axis)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_match_torch_over_steps(rng, torch, dtype):
    kinds = ((cynorm.InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 5, 11)),
             (cynorm.InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 5, 6, 4)),
             (cynorm.InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 5, 3, 4, 2)))
    tol = 2e-5 if dtype == np.float32 else 1e-10
    for ours, theirs, shape in kinds:
        for affine, track in ((False, False), (True, True), (True, False), (False, True)):
            layer = ours(5, affine=affine, track_running_stats=track, momentum=0.3, dtype=dtype)
            module = theirs(5, affine=affine, track_running_stats=track, momentum=0.3).double()
            if affine:
                with torch.no_grad():
                    module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 5)))
                    module.bias.copy_(torch.from_numpy(rng.standard_normal(5)))
            layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
            assert list(layer.state_dict()) == list(module.state_dict())
            for mode in ("train", "train", "train", "eval", "eval"):
                getattr(layer, mode)()
                getattr(module, mode)()
                x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
                g = rng.standard_normal(shape).astype(dtype)
                xt = torch.tensor(x.astype(np.float64), requires_grad=True)
                yt = module(xt)
                yt.backward(torch.from_numpy(g.astype(np.float64)))
                y = layer(x)
                dx = layer.backward(g)
                np.testing.assert_allclose(y, yt.detach().numpy(), atol=tol * 10)
                np.testing.assert_allclose(dx, xt.grad.numpy(), atol=tol * 100)
                if affine:
                    np.testing.assert_allclose(layer.grad_weight, module.weight.grad.numpy(),
                                               rtol=tol * 10, atol=tol * 100)
                    np.testing.assert_allclose(layer.grad_bias, module.bias.grad.numpy(),
                                               rtol=tol * 10, atol=tol * 100)
                    module.zero_grad()
                for k, v in module.state_dict().items():
                    np.testing.assert_allclose(layer.state_dict()[k], v.numpy(), rtol=tol,
                                               atol=tol)
            if track:
                assert int(layer.num_batches_tracked) == 0  # as torch 2.13


def test_unbatched_input(rng, torch):
    layer = cynorm.InstanceNorm1d(3, affine=True)
    x = rng.standard_normal((3, 8))
    y = layer(x)
    assert y.shape == (3, 8)
    expect = torch.nn.InstanceNorm1d(3, affine=True).double()(torch.from_numpy(x))
    np.testing.assert_allclose(y, expect.detach().numpy(), atol=1e-12)
    assert layer.backward(np.ones((3, 8))).shape == (3, 8)
    assert cynorm.InstanceNorm2d(3)(rng.standard_normal((3, 4, 5))).shape == (3, 4, 5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_backward_against_reference(rng, dtype, axis):
    shape = (3, 4, 9, 7)
    x = hostile(rng, shape, dtype, offset=1e3)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(-2, 2, 4).astype(dtype)
    ref_dx, ref_dw, ref_db = reference_group_backward(g, x, 4, w)
    xa, ga = (x, g) if axis == 1 else (channels_last(x), channels_last(g))
    _, mean, rstd = cynorm.instance_norm(xa, weight=w, axis=axis, return_stats=True)
    dx, dw, db = cynorm.instance_norm_backward(ga, xa, mean, rstd, w, bias=np.zeros(4),
                                               axis=axis)
    if axis == -1:
        dx = np.moveaxis(dx, -1, 1)
    tol = 2e-4 if dtype == np.float32 else 1e-9
    assert max_err(dx, ref_dx) <= tol * max(1.0, np.abs(ref_dx).max())
    np.testing.assert_allclose(dw, ref_dw, rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(db, ref_db, rtol=tol, atol=tol * 10)


def test_backward_finite_differences(rng):
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    for use_input in (True, False):
        def loss():
            return float(np.sum(g * cynorm.instance_norm(x, rm.copy(), rv.copy(), w, b,
                                                         use_input, momentum=None)))

        _, mean, rstd = cynorm.instance_norm(x, rm.copy(), rv.copy(), w, b, use_input,
                                             momentum=None, return_stats=True)
        dx, dw, db = cynorm.instance_norm_backward(g, x, mean, rstd, w,
                                                   use_input_stats=use_input, bias=b)
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("axis", [1, -1])
def test_masks_match_cut_sequences_and_running_stats(rng, axis):
    N, C, L = 4, 3, 20
    lengths = np.array([20, 7, 0, 1])
    shape = (N, C, L) if axis == 1 else (N, L, C)
    x = hostile(rng, shape, np.float64, offset=1e4)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, rstd = cynorm.instance_norm(x, rm, rv, lengths=lengths, axis=axis, momentum=0.5,
                                         return_stats=True)
    inst_means, inst_vars = [], []
    for n, Ln in enumerate(lengths):
        cut = x[n, :, :Ln] if axis == 1 else x[n, :Ln].T  # (C, Ln)
        part = y[n, :, :Ln] if axis == 1 else y[n, :Ln].T
        pad = y[n, :, Ln:] if axis == 1 else y[n, Ln:]
        assert (pad == 0).all()
        if Ln == 0:
            assert np.isnan(mean[n]).all()
            continue
        np.testing.assert_allclose(part, reference_group_norm(cut[None], C)[0][0], atol=1e-11)
        if Ln >= 2:  # the instances with an unbiased variance make the running statistics
            inst_means.append(cut.mean(axis=1))
            inst_vars.append(cut.var(axis=1, ddof=1))
    np.testing.assert_allclose(rm, 0.5 * np.mean(inst_means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * np.mean(inst_vars, axis=0), rtol=1e-12)
    g = rng.standard_normal(shape)
    dx, _, _ = cynorm.instance_norm_backward(g, x, mean, rstd, lengths=lengths, axis=axis)
    for n, Ln in enumerate(lengths):
        pad = dx[n, :, Ln:] if axis == 1 else dx[n, Ln:]
        assert (pad == 0).all()
        if Ln:
            cut = (slice(n, n + 1), slice(None), slice(0, Ln)) if axis == 1 else \
                (slice(n, n + 1), slice(0, Ln))
            ref = reference_group_backward(g[cut], x[cut], C, axis=axis)[0]
            assert max_err(dx[cut], ref) <= 1e-9 * max(1.0, np.abs(ref).max())


def test_thread_count_does_not_change_results(rng):
    x = hostile(rng, (5, 12, 33, 7), np.float32, offset=1e2)
    g = rng.standard_normal(x.shape).astype(np.float32)
    runs = []
    for n in (1, 2):
        with cynorm.num_threads(n):
            rm, rv = np.zeros(12, np.float32), np.ones(12, np.float32)
            y, mean, rstd = cynorm.instance_norm(x, rm, rv, np.ones(12, np.float32),
                                                 return_stats=True)
            grads = cynorm.instance_norm_backward(g, x, mean, rstd, np.ones(12, np.float32),
                                                  bias=np.zeros(12, np.float32))
        runs.append((y, mean, rstd, rm, rv) + grads)
    for a, c in zip(*runs):
        np.testing.assert_array_equal(a, c)


def test_errors_match_torch(torch):
    F = torch.nn.functional
    for shape in ((2, 3, 1), (2, 3)):
        with pytest.raises(ValueError, match="Expected more than 1 spatial element when "
                                             "training"):
            cynorm.instance_norm(np.zeros(shape))
        with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
            F.instance_norm(torch.zeros(shape))
    # with the running statistics in use, one spatial element is fine
    cynorm.instance_norm(np.zeros((2, 3, 1)), np.zeros(3), np.ones(3), use_input_stats=False)
    with pytest.raises(RuntimeError, match="Expected running_mean and running_var to be "
                                           "defined when use_input_stats is false"):
        cynorm.instance_norm(np.zeros((2, 3, 4)), use_input_stats=False)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        cynorm.instance_norm(np.zeros((2, 3, 4)), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="running_mean and running_var together"):
        cynorm.instance_norm(np.zeros((2, 3, 4)), np.zeros(3), None)
    with pytest.raises(TypeError, match="running_mean must be a float numpy.ndarray"):
        cynorm.instance_norm(np.zeros((2, 3, 4)), [0, 0, 0], np.ones(3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        cynorm.InstanceNorm1d(3)(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"expected 3D or 4D input \(got 2D input\)"):
        cynorm.InstanceNorm2d(3)(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"expected input's size at dim=1 to match "
                                         r"num_features \(3\), but got: 4"):
        cynorm.InstanceNorm1d(3, affine=True)(np.zeros((2, 4, 5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cynorm.InstanceNorm1d(3)(np.ones((2, 4, 5)))
    assert any("does not match num_features" in str(c.message) for c in caught)
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        cynorm.InstanceNorm1d(3).backward(np.zeros((2, 3, 4)))
    assert repr(cynorm.InstanceNorm2d(4)) == ("InstanceNorm2d(4, eps=1e-05, momentum=0.1, "
                                              "affine=False, track_running_stats=False)")


def test_onnx_ops_are_the_same_calls(rng):
    """ONNX GroupNormalization-21 (per-channel scale and bias) and InstanceNormalization are
    group_norm and instance_norm."""
    from conftest import optional
    onnx = optional("onnx")
    ort = optional("onnxruntime")
    from onnx import TensorProto, helper

    x = (rng.standard_normal((2, 8, 5, 3)) * 2 + 1).astype(np.float32)
    scale = rng.uniform(0.5, 2, 8).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    for op, attrs, opset, ours in (
            ("GroupNormalization", {"num_groups": 4, "epsilon": 1e-5}, 21,
             lambda: cynorm.group_norm(x, 4, scale, bias)),
            ("InstanceNormalization", {"epsilon": 1e-5}, 17,
             lambda: cynorm.instance_norm(x, weight=scale, bias=bias))):
        node = helper.make_node(op, ["x", "s", "b"], ["y"], **attrs)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                          for n, s in (("x", x.shape), ("s", (8,)), ("b", (8,)))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        expect = sess.run(None, {"x": x, "s": scale, "b": bias})[0]
        np.testing.assert_allclose(ours(), expect, atol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_one_real_position_has_zero_input_gradient(rng, dtype, axis):
    """An instance with one real position normalizes to the constant bias, so its dx is 0
    exactly (not the rounding k1·g + k3 leaves, terms rstd = 1/sqrt(eps) times larger than
    the result: 1.4e-5 in float32 before), whatever the layout and the thread count."""
    x = (100 + rng.standard_normal((3, 6, 40))).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    if axis == -1:
        x, g = (np.ascontiguousarray(np.moveaxis(a, 1, -1)) for a in (x, g))
    w = rng.uniform(0.5, 2, 6).astype(dtype)
    lengths = np.array([40, 1, 7])
    for threads in (1, 2):
        with cynorm.num_threads(threads):
            _, mean, rstd = cynorm.instance_norm(x, weight=w, bias=w, axis=axis,
                                                 lengths=lengths, return_stats=True)
            dx, _, db = cynorm.instance_norm_backward(g, x, mean, rstd, w, bias=w, axis=axis,
                                                      lengths=lengths)
        assert not dx[1].any()
        real = np.arange(40) < lengths[:, None]   # db: Σg over the real positions
        real = real[:, None, :] if axis == 1 else real[:, :, None]
        np.testing.assert_allclose(db, np.where(real, g, 0).astype(np.float64).sum(
            axis=(0, 2) if axis == 1 else (0, 1)), rtol=1e-5, atol=1e-5)
