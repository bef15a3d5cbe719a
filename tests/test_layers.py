import pickle

import numpy as np
import pytest

import cynorm
from conftest import max_err


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
