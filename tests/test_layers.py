import pickle

import numpy as np
import pytest

import cynorm
from conftest import hostile, max_err, reference_eval_backward


def test_layer_norm_defaults_and_aliases():
    ln = cynorm.LayerNorm((4, 5))
    assert ln.weight.shape == (4, 5) and ln.weight.dtype == np.float32
    assert (ln.weight == 1).all() and (ln.bias == 0).all()
    assert ln.alpha is ln.weight and ln.beta is ln.bias
    assert cynorm.LayerNorm(3, bias=False).bias is None
    off = cynorm.LayerNorm(3, elementwise_affine=False)
    assert off.weight is None and off.bias is None and off.state_dict() == {}
    assert repr(cynorm.LayerNorm(10)) == "LayerNorm((10,), eps=1e-05, elementwise_affine=True)"


def test_layer_norm_layer_matches_torch(rng, torch):
    tln = torch.nn.LayerNorm(10)
    with torch.no_grad():
        tln.weight.copy_(torch.randn(10))
        tln.bias.copy_(torch.randn(10))
    ln = cynorm.LayerNorm(10)
    ln.load_state_dict({k: v.numpy() for k, v in tln.state_dict().items()})
    x = rng.standard_normal((5, 10)).astype(np.float32)
    with torch.no_grad():
        expect = tln(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ln(x), expect, atol=1e-5)
    ln.eval()
    np.testing.assert_allclose(ln(x), expect, atol=1e-5)  # LN: train and eval alike


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (16, 6)), ("BatchNorm1d", (8, 6, 30)),
                                       ("BatchNorm2d", (4, 6, 5, 7))])
def test_batch_norm_steps_then_eval_match_torch(rng, torch, cls, shape, momentum):
    tbn = getattr(torch.nn, cls)(6, momentum=momentum)
    bn = getattr(cynorm, cls)(6, momentum=momentum)
    with torch.no_grad():
        tbn.weight.copy_(torch.rand(6) + 0.5)
        tbn.bias.copy_(torch.randn(6))
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    for step in range(5):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(np.float32)
        with torch.no_grad():
            expect = tbn(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(bn(x), expect, atol=2e-5)
    for k, v in tbn.state_dict().items():
        np.testing.assert_allclose(getattr(bn, k), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(bn.num_batches_tracked) == 5
    tbn.eval()
    bn.eval()
    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expect = tbn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bn(x), expect, atol=2e-5)
    assert int(bn.num_batches_tracked) == 5


def test_batch_norm_without_running_stats_uses_batch_statistics(rng, torch, ref_batch_norm):
    bn = cynorm.BatchNorm1d(4, track_running_stats=False, affine=False)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    assert set(bn.state_dict()) == set()
    x = rng.standard_normal((20, 4)).astype(np.float32)
    bn.eval()
    assert max_err(bn(x), ref_batch_norm(x, 1)) <= 1e-5
    tbn = torch.nn.BatchNorm1d(4, track_running_stats=False, affine=False).eval()
    np.testing.assert_allclose(bn(x), tbn(torch.from_numpy(x)).numpy(), atol=1e-5)


def test_batch_norm_feature_last(rng, torch):
    bn = cynorm.BatchNorm(12, axis=-1, dtype=np.float64)
    tbn = torch.nn.BatchNorm1d(12, dtype=torch.float64)
    for _ in range(3):
        x = rng.standard_normal((4, 9, 12))
        got = bn(x)
        expect = tbn(torch.from_numpy(x).permute(0, 2, 1)).permute(0, 2, 1).detach().numpy()
        np.testing.assert_allclose(got, expect, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-13)
    assert "axis=-1" in repr(bn)


def test_ndim_and_feature_checks(rng):
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        cynorm.BatchNorm1d(3)(np.ones((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        cynorm.BatchNorm2d(3)(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"expected 5D input"):
        cynorm.BatchNorm3d(3)(np.ones((2, 3, 4, 5)))
    bn = cynorm.BatchNorm1d(3)
    with pytest.raises(ValueError, match="expected 3 features on axis 1"):
        bn(np.ones((4, 5)))
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(np.ones((1, 3)))
    assert int(bn.num_batches_tracked) == 0 and (bn.running_mean == 0).all()
    with pytest.raises(ValueError, match="num_features"):
        cynorm.BatchNorm(0)
    with pytest.raises(TypeError, match="dtype"):
        cynorm.LayerNorm(3, dtype=np.int32)


def test_load_state_dict_errors_leave_layer_unchanged(rng):
    bn = cynorm.BatchNorm1d(3)
    bn(rng.standard_normal((10, 3)).astype(np.float32))
    before = bn.state_dict()
    good = {k: np.array(v) for k, v in before.items()}
    bad_cases = [
        ({**good, "running_var": np.ones(4)}, ValueError, "size mismatch"),
        ({k: v for k, v in good.items() if k != "bias"}, KeyError, "missing"),
        ({**good, "extra": np.ones(3)}, KeyError, "unexpected"),
        ({**good, "weight": np.array(["a", "b", "c"])}, TypeError, "weight"),
        ({**good, "num_batches_tracked": np.array(1.5)}, TypeError, "num_batches_tracked"),
        ({**good, "running_var": np.ones(3, complex)}, TypeError, "running_var"),
        ({**good, "bias": np.ones(3, bool)}, TypeError, "bias"),
    ]
    for sd, err, match in bad_cases:
        sd["running_mean"] = np.full(3, 7.0)  # would be written first if loading were not atomic
        with pytest.raises(err, match=match):
            bn.load_state_dict(sd)
        for k, v in before.items():
            np.testing.assert_array_equal(getattr(bn, k), v)
    with pytest.raises(TypeError, match="mapping"):
        bn.load_state_dict([1, 2])


def test_state_dict_from_an_npz_file(rng, tmp_path, torch):
    tbn = torch.nn.BatchNorm1d(3)
    tbn(torch.randn(20, 3))
    path = tmp_path / "from_torch.npz"
    np.savez(path, **{k: v.numpy() for k, v in tbn.state_dict().items()})
    bn = cynorm.BatchNorm1d(3)
    bn.load_state_dict(path)
    bn.load_state_dict(str(path))
    for k, v in tbn.state_dict().items():
        np.testing.assert_allclose(getattr(bn, k), v.numpy())
    bn.save_state_dict(tmp_path / "mine.npz")
    again = cynorm.BatchNorm1d(3).load_state_dict(tmp_path / "mine.npz")
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(getattr(again, k), v)


def test_state_dict_npz_written_by_someone_else(rng, tmp_path):
    bn = cynorm.BatchNorm1d(3)
    bn(rng.standard_normal((10, 3)).astype(np.float32))
    before = bn.state_dict()
    good = {k: np.array(v) for k, v in before.items()}
    cases = [
        # an object array would need unpickling: refused, never loaded
        ({**good, "running_mean": np.array([object()] * 3, dtype=object)}, ValueError, "pickle"),
        ({**good, "running_var": np.ones((3, 1))}, ValueError, "size mismatch"),
        ({**good, "weight": np.array(["a", "b", "c"])}, TypeError, "weight"),
        ({**good, "running_var": np.ones(3, complex)}, TypeError, "running_var"),
    ]
    for i, (sd, err, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **sd)
        with pytest.raises(err, match=match):
            bn.load_state_dict(path)
        for k, v in before.items():
            np.testing.assert_array_equal(getattr(bn, k), v)
    with pytest.raises(FileNotFoundError):
        bn.load_state_dict(tmp_path / "missing.npz")


def test_state_dict_round_trip_and_identity(rng):
    bn = cynorm.BatchNorm2d(2)
    w = bn.weight
    sd = {"weight": np.array([2.0, 3.0]), "bias": np.array([1.0, -1.0]),
          "running_mean": np.array([0.5, 0.25]), "running_var": np.array([4.0, 9.0]),
          "num_batches_tracked": np.array(7)}
    bn.load_state_dict(sd)
    assert bn.weight is w and bn.alpha is w and w.dtype == np.float32
    out = bn.state_dict()
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k])
    out["weight"][0] = 100  # a copy
    assert bn.weight[0] == 2.0
    partial = cynorm.BatchNorm2d(2)
    partial.load_state_dict({"weight": np.array([5.0, 6.0])}, strict=False)
    assert (partial.weight == [5, 6]).all() and (partial.running_var == 1).all()


def test_train_eval_and_pickle(rng):
    bn = cynorm.BatchNorm1d(3)
    assert bn.training and bn.eval() is bn and not bn.training and bn.train().training
    bn(rng.standard_normal((8, 3)).astype(np.float32))
    clone = pickle.loads(pickle.dumps(bn))
    np.testing.assert_array_equal(clone.running_mean, bn.running_mean)
    x = rng.standard_normal((8, 3)).astype(np.float32)
    np.testing.assert_array_equal(clone.eval()(x), bn.eval()(x))


def test_layers_in_float64_and_float16(rng, ref_layer_norm):
    x = rng.standard_normal((3, 8))
    ln = cynorm.LayerNorm(8, dtype=np.float64)
    assert ln(x).dtype == np.float64 and max_err(ln(x), ref_layer_norm(x, 8)) <= 1e-12
    h = x.astype(np.float16)
    assert cynorm.LayerNorm(8, dtype=np.float16)(h).dtype == np.float16


def _torch_module_like(torch, rng, cls, C, bias=True):
    """A float64 torch module with random affine parameters, and a cynorm twin of it."""
    theirs = getattr(torch.nn, cls)(C, dtype=torch.float64, bias=bias)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, C)))
        if bias:
            theirs.bias.copy_(torch.from_numpy(rng.standard_normal(C)))
    ours = getattr(cynorm, cls)(C, dtype=np.float64, bias=bias)
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return theirs, ours


def _torch_grads(torch, module, x, g):
    """(y, dx, dweight, dbias) of torch's module on x under autograd (dbias None without bias)."""
    module.zero_grad()
    xt = torch.from_numpy(x).requires_grad_()
    y = module(xt)
    y.backward(torch.from_numpy(g))
    db = None if module.bias is None else module.bias.grad.numpy()
    return y.detach().numpy(), xt.grad.numpy(), module.weight.grad.numpy(), db


def _assert_grads_match(ours, dx, expect):
    y, tdx, tdw, tdb = expect
    for got, want, name in ((dx, tdx, "dx"), (ours.grad_weight, tdw, "grad_weight"),
                            (ours.grad_bias, tdb, "grad_bias")):
        if want is None:
            assert got is None, name
            continue
        assert got.shape == want.shape, name
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        assert max_err(got, want) <= 1e-10 * scale, name


@pytest.mark.parametrize("after", ["a training step", "load_state_dict"])
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (16, 5)), ("BatchNorm1d", (8, 5, 70)),
                                       ("BatchNorm1d", (8, 5, 9)), ("BatchNorm2d", (4, 5, 6, 7)),
                                       ("BatchNorm3d", (2, 5, 3, 4, 5))])
def test_frozen_batch_norm_backward_matches_torch(rng, torch, cls, shape, after):
    """eval(), forward, backward: the running statistics are constants, as in torch; the
    gradient is of this eval forward, never of an earlier training one."""
    theirs, ours = _torch_module_like(torch, rng, cls, shape[1])
    if after == "a training step":
        x1 = hostile(rng, shape, offset=50.0, scale=3.0)
        theirs(torch.from_numpy(x1))
        ours(x1)
    else:  # fresh statistics, straight from a state_dict
        sd = theirs.state_dict()
        sd["running_mean"] = torch.from_numpy(rng.standard_normal(shape[1]) * 10)
        sd["running_var"] = torch.from_numpy(rng.uniform(0.1, 9.0, shape[1]))
        theirs.load_state_dict(sd)
        ours.load_state_dict({k: v.numpy() for k, v in sd.items()})
    theirs.eval()
    ours.eval()
    x2 = hostile(rng, shape, offset=-7.0, scale=2.0)
    g = rng.standard_normal(shape) * 3
    expect = _torch_grads(torch, theirs, x2, g)
    assert max_err(ours(x2), expect[0]) <= 1e-12
    _assert_grads_match(ours, ours.backward(g), expect)
    # and against the float64 formulas: dx = g·w·invstd, dw = Σ g·x̂, db = Σ g
    invstd = 1.0 / np.sqrt(ours.running_var + ours.eps)
    ref = reference_eval_backward(g, x2, ours.running_mean, invstd, ours.weight, 1)
    _assert_grads_match(ours, ours.backward(g), (None,) + ref)


@pytest.mark.parametrize("shape", [(16, 5), (6, 5, 11)])
def test_batch_norm_backward_follows_the_mode_of_the_last_forward(rng, torch, shape):
    theirs, ours = _torch_module_like(torch, rng, "BatchNorm1d", shape[1])
    x1, x2, x3 = (hostile(rng, shape, offset=o, scale=2.0) for o in (3.0, -5.0, 8.0))
    g = rng.standard_normal(shape)
    for mode, x in (("train", x1), ("eval", x2), ("train", x3), ("eval", x1)):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        expect = _torch_grads(torch, theirs, x, g)
        assert max_err(ours(x), expect[0]) <= 1e-11
        _assert_grads_match(ours, ours.backward(g), expect)
    # the running statistics changed after the eval forward: backward keeps that forward's
    ours.load_state_dict({**ours.state_dict(), "running_mean": np.full(shape[1], 99.0),
                          "running_var": np.full(shape[1], 1e-3)})
    _assert_grads_match(ours, ours.backward(g), expect)
    # a failed forward leaves nothing for backward to answer with
    with pytest.raises(ValueError, match="expected 5 features"):
        ours(np.ones((4, 6)))
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        ours.backward(g)


def test_batch_norm_without_running_stats_backward_in_eval(rng, torch):
    """track_running_stats=False: eval normalizes with batch statistics, so its gradient is
    the training one (through the statistics)."""
    theirs = torch.nn.BatchNorm1d(4, track_running_stats=False, dtype=torch.float64).eval()
    ours = cynorm.BatchNorm1d(4, track_running_stats=False, dtype=np.float64).eval()
    x = hostile(rng, (12, 4, 3), offset=20.0, scale=1.5)
    g = rng.standard_normal(x.shape)
    expect = _torch_grads(torch, theirs, x, g)
    assert max_err(ours(x), expect[0]) <= 1e-12
    _assert_grads_match(ours, ours.backward(g), expect)


def test_layer_norm_backward_is_of_the_last_forward_in_either_mode(rng, torch):
    theirs = torch.nn.LayerNorm(9, dtype=torch.float64)
    ours = cynorm.LayerNorm(9, dtype=np.float64)
    g = rng.standard_normal((5, 9))
    for mode in ("train", "eval", "train"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        x = hostile(rng, (5, 9), offset=rng.choice([0.0, -30.0, 300.0]))  # torch keeps up
        expect = _torch_grads(torch, theirs, x, g)
        assert max_err(ours(x), expect[0]) <= 1e-9
        _assert_grads_match(ours, ours.backward(g), expect)
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        cynorm.LayerNorm(9).eval().backward(g)


@pytest.mark.parametrize("cls", ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_batch_norm_bias_false(rng, torch, cls):
    """torch 2.13's keyword-only bias=False: a weight and no bias, no 'bias' in state_dict."""
    bn = getattr(cynorm, cls)(4, bias=False)
    assert bn.bias is None and bn.weight is not None
    tname = "BatchNorm1d" if cls == "BatchNorm" else cls
    assert list(bn.state_dict()) == list(getattr(torch.nn, tname)(4, bias=False).state_dict())
    with pytest.raises(TypeError):
        getattr(cynorm, cls)(4, 1e-5, 0.1, True, True, np.float32, False, False)
    shape = {"BatchNorm": (9, 4), "BatchNorm1d": (9, 4), "BatchNorm2d": (3, 4, 2, 5),
             "BatchNorm3d": (2, 4, 3, 2, 2)}[cls]
    theirs, ours = _torch_module_like(torch, rng, tname, 4, bias=False)
    x = hostile(rng, shape, offset=4.0, scale=1.0)
    g = rng.standard_normal(shape)
    expect = _torch_grads(torch, theirs, x, g)
    assert max_err(ours(x), expect[0]) <= 1e-11
    _assert_grads_match(ours, ours.backward(g), expect)
    assert ours.grad_bias is None


@pytest.mark.parametrize("x_dtype", [np.float16, np.float32])
def test_batch_norm_layer_in_float16_trains(rng, torch, x_dtype):
    """float16 running buffers: updated in float64, rounded once, as torch stores them."""
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float16)
    ours = cynorm.BatchNorm1d(3, dtype=np.float16)
    for step in range(3):
        x = (rng.standard_normal((32, 3)) * 2 + 5).astype(np.float16)
        theirs(torch.from_numpy(x))
        y = ours(x.astype(x_dtype))
        assert y.dtype == x_dtype
    for k in ("running_mean", "running_var"):
        got = getattr(ours, k)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, getattr(theirs, k).numpy(), rtol=2e-3, err_msg=k)
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5)])
def test_batch_norm_layer_on_an_empty_batch(rng, torch, shape):
    """As torch: an empty output, the running statistics unchanged, the batch still counted,
    zero parameter gradients."""
    for momentum in (0.1, None):
        theirs = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
        ours = cynorm.BatchNorm1d(3, momentum=momentum, dtype=np.float64)
        x = rng.standard_normal((6,) + shape[1:])
        theirs(torch.from_numpy(x))
        ours(x)
        before = ours.state_dict()
        expect = _torch_grads(torch, theirs, np.empty(shape), np.empty(shape))
        assert ours(np.empty(shape)).shape == shape
        _assert_grads_match(ours, ours.backward(np.empty(shape)), expect)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
        for k in ("running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(ours, k), before[k])
            np.testing.assert_allclose(getattr(ours, k), getattr(theirs, k).numpy(),
                                       rtol=1e-12, atol=1e-14)  # a mean may be near 0
