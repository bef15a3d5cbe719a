"""BatchNorm.partial_fit / fit: exact statistics over batches, frozen into the running ones."""
import threading

import numpy as np
import pytest

import cynorm
from conftest import TOL, hostile, max_err, reference_moments


def assert_fitted(bn, x, axes, mask=None):
    count, mean, var = reference_moments(x, axes, mask)
    unbiased = var * count / (count - 1)
    tol = 1e-12 if bn.dtype == np.float64 else 1e-6
    sd = np.sqrt(var)
    assert np.all(np.abs(bn.running_mean - mean) <= tol * (np.abs(mean) + sd))
    np.testing.assert_allclose(bn.running_var, unbiased, rtol=tol)
    np.testing.assert_array_equal(bn.moments_.count, count)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layer,shape,axes", [
    (lambda dt: cynorm.BatchNorm1d(6, dtype=dt), (300, 6), (0,)),
    (lambda dt: cynorm.BatchNorm1d(6, dtype=dt), (300, 6, 80), (0, 2)),
    (lambda dt: cynorm.BatchNorm2d(6, dtype=dt), (60, 6, 5, 7), (0, 2, 3)),
    (lambda dt: cynorm.BatchNorm(6, axis=-1, dtype=dt), (40, 30, 6), (0, 1)),
])
def test_any_split_gives_the_statistics_of_the_whole(rng, dtype, layer, shape, axes):
    x = hostile(rng, shape, dtype, offset=rng.choice([0.0, 1e4, 1e6]))
    for _ in range(3):
        bn = layer(dtype)
        cuts = np.sort(rng.integers(1, shape[0], size=rng.integers(1, 6)))
        for part in np.split(x, cuts):
            assert bn.partial_fit(part) is bn
        assert_fitted(bn, x, axes)
        assert int(bn.num_batches_tracked) == len(cuts) + 1
    # fit: from a list of batches, a generator, one array
    for data in (np.split(x, cuts), (b for b in np.split(x, cuts)), x):
        bn = layer(dtype)
        bn.fit(data)
        assert_fitted(bn, x, axes)


def test_fit_starts_afresh(rng):
    bn = cynorm.BatchNorm1d(3, dtype=np.float64)
    bn.partial_fit(rng.standard_normal((50, 3)) + 100)
    x = rng.standard_normal((70, 3))
    bn.fit(x)
    assert_fitted(bn, x, (0,))
    assert int(bn.num_batches_tracked) == 1


def test_eval_after_fit_normalizes_with_the_fitted_statistics(rng, ref_batch_norm):
    x = hostile(rng, (512, 8, 20), np.float32, offset=1e4)
    bn = cynorm.BatchNorm1d(8)
    bn.weight[...] = rng.uniform(0.5, 2, 8)
    bn.bias[...] = rng.uniform(-1, 1, 8)
    bn.fit(np.array_split(x, 9))
    bn.eval()
    new = x[rng.permutation(len(x))[:16]]  # samples of the fitted distribution
    y = bn(new)
    want = ref_batch_norm(new, 1, bn.weight, bn.bias, bn.eps, bn.running_mean, bn.running_var)
    assert max_err(y, want) <= 4 * TOL[np.dtype(np.float32)]


def test_fit_from_a_memmap_chunk_by_chunk(rng, tmp_path):
    x = hostile(rng, (10000, 16), np.float32, offset=1e3)
    path = tmp_path / "data.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[...] = x
    mm.flush()
    del mm
    data = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    bn = cynorm.BatchNorm1d(16, dtype=np.float64)
    for start in range(0, len(data), 1536):
        bn.partial_fit(data[start:start + 1536])
    assert_fitted(bn, x, (0,))


def test_masked_partial_fit_counts_real_tokens(rng):
    x = hostile(rng, (12, 40, 5), np.float32, offset=1e2)
    lengths = rng.integers(0, 41, size=12)
    lengths[0] = 40
    mask = np.arange(40) < lengths[:, None]
    padded = np.where(mask[..., None], x, np.float32(1e30))
    bn = cynorm.BatchNorm(5, axis=-1, dtype=np.float64)
    bn.partial_fit(padded[:5], lengths=lengths[:5])
    bn.partial_fit(padded[5:], mask=mask[5:])
    assert_fitted(bn, x, (0, 1), mask)
    with pytest.raises(ValueError, match="features on the last axis"):
        cynorm.BatchNorm1d(5).partial_fit(np.ones((3, 5, 4)), mask=np.ones((3, 5), bool))


def test_running_var_waits_for_two_values(rng):
    bn = cynorm.BatchNorm1d(2, dtype=np.float64)
    bn.partial_fit(np.array([[3.0, 4.0]]))
    np.testing.assert_array_equal(bn.running_mean, [3.0, 4.0])
    np.testing.assert_array_equal(bn.running_var, [1.0, 1.0])  # untouched: no variance yet
    bn.partial_fit(np.array([[5.0, 8.0]]))
    np.testing.assert_allclose(bn.running_var, [2.0, 8.0])


def test_errors(rng):
    with pytest.raises(ValueError, match="track_running_stats"):
        cynorm.BatchNorm1d(3, track_running_stats=False).partial_fit(np.ones((4, 3)))
    bn = cynorm.BatchNorm1d(3)
    with pytest.raises(ValueError, match="expected 3 features"):
        bn.partial_fit(np.ones((4, 5)))
    with pytest.raises(ValueError, match="2D or 3D"):
        bn.partial_fit(np.ones(4))
    with pytest.raises(ValueError, match="no batches"):
        bn.fit(iter([]))
    with pytest.raises(ValueError, match="single array"):
        bn.fit([np.ones((4, 3))], mask=np.ones(4, bool))
    with pytest.raises(TypeError, match="complex"):
        bn.partial_fit(np.ones((4, 3), complex))
    assert bn.moments_ is None
    np.testing.assert_array_equal(bn.running_mean, 0.0)


def test_concurrent_partial_fit_loses_nothing(rng):
    x = hostile(rng, (64, 400, 4), np.float64)
    bn = cynorm.BatchNorm(4, axis=-1, dtype=np.float64)

    def work(lo, hi):
        for i in range(lo, hi):
            bn.partial_fit(x[i])

    threads = [threading.Thread(target=work, args=(k * 16, (k + 1) * 16)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_fitted(bn, x, (0, 1))
    assert int(bn.num_batches_tracked) == 64
