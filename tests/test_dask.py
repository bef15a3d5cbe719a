"""cynorm.dask: moments by reduction, batch_norm / layer_norm / rms_norm by map_blocks, on a
LocalCluster."""
import numpy as np
import pytest

import cynorm
from conftest import TOL, hostile, max_err, optional

da = optional("dask.array")
import cynorm.dask as cd  # noqa: E402

# (shape, chunks, reduced axes)
CASES = [((1000, 6), (97, 4), (0,)), ((200, 6, 30), (37, 4, 7), (0, 2)),
         ((30, 20, 5), (7, 6, 5), (0, 1)), ((12, 5, 9, 7), (5, 2, 4, 3), (0, 2, 3)),
         ((500, 4), (500, 4), (0,)), ((400, 3), (50, 1), None)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,chunks,axes", CASES)
def test_moments_equal_in_memory(rng, dtype, shape, chunks, axes):
    x = hostile(rng, shape, dtype, offset=rng.choice([0.0, 1e4, 1e6]))
    d = da.from_array(x, chunks=chunks)
    want = cynorm.moments(x, axes)
    for split_every in (None, 2):
        got = cd.moments(d, axes, split_every=split_every, scheduler="threads")
        np.testing.assert_array_equal(got.count, want.count)
        sd = want.std()
        assert np.all(np.abs(got.mean - want.mean) <= 4e-16 * np.abs(want.mean) + 1e-13 * sd)
        np.testing.assert_allclose(got.var(), want.var(), rtol=1e-12, atol=1e-300)


def test_moments_records_is_lazy_and_chunked_like_the_features(rng):
    d = da.from_array(rng.standard_normal((100, 10)), chunks=(30, 4))
    rec = cd.moments_records(d, 0)
    assert isinstance(rec, da.Array) and rec.chunks == ((4, 4, 2),)
    assert rec.dtype.names == ("count", "mean", "mean_lo", "m2")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,chunks,axis", [((1000, 6), (97, 4), 1),
                                               ((64, 6, 30), (17, 4, 7), 1),
                                               ((20, 15, 6), (7, 4, 3), -1)])
def test_batch_norm_equals_in_memory(rng, ref_batch_norm, dtype, shape, chunks, axis):
    x = hostile(rng, shape, dtype, offset=rng.choice([0.0, 1e4, 1e6]))
    C = shape[axis]
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    d = da.from_array(x, chunks=chunks)
    y = cd.batch_norm(d, weight=w, bias=b, training=True, axis=axis)
    assert y.dtype == dtype
    y = y.compute(scheduler="threads")
    assert max_err(y, ref_batch_norm(x, axis, w, b)) <= 4 * TOL[np.dtype(dtype)]
    rm = rng.standard_normal(C)
    rv = rng.uniform(0.5, 2, C)
    y = cd.batch_norm(d, rm, rv, w, b, axis=axis).compute()
    np.testing.assert_array_equal(y, cynorm.batch_norm(x, rm, rv, w, b, axis=axis))


@pytest.mark.parametrize("chunks", [(7, 5, 12), (7, 2, 5)])
def test_layer_norm_equals_in_memory(rng, chunks):
    x = hostile(rng, (21, 5, 12), np.float32, offset=1e3)
    w = rng.uniform(0.5, 2, (5, 12)).astype(np.float32)
    d = da.from_array(x, chunks=chunks)  # the second splits the normalized dims: rechunked
    y = cd.layer_norm(d, (5, 12), w, None).compute()
    np.testing.assert_array_equal(y, cynorm.layer_norm(x, (5, 12), w))


@pytest.mark.parametrize("chunks", [(7, 5, 12), (7, 2, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rms_norm_equals_in_memory(rng, chunks, dtype):
    x = hostile(rng, (21, 5, 12), dtype, offset=1e3)
    w = rng.uniform(0.5, 2, (5, 12)).astype(dtype)
    d = da.from_array(x, chunks=chunks)
    for eps in (None, 1e-3):
        y = cd.rms_norm(d, (5, 12), w, eps).compute()
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, cynorm.rms_norm(x, (5, 12), w, eps))
    np.testing.assert_array_equal(cd.rms_norm(d, 12).compute(), cynorm.rms_norm(x, 12))
    with pytest.raises(ValueError, match="weight must have shape"):
        cd.rms_norm(d, 12, np.ones(5))


@pytest.mark.parametrize("chunks", [(3, 8, 5, 6), (2, 3, 2, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_and_instance_norm_equal_in_memory(rng, chunks, dtype):
    x = hostile(rng, (7, 8, 5, 6), dtype, offset=1e3)
    w = rng.uniform(0.5, 2, 8).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    d = da.from_array(x, chunks=chunks)  # the second splits a sample: rechunked
    y = cd.group_norm(d, 4, w, b).compute()
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, cynorm.group_norm(x, 4, w, b))
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    yl = cd.group_norm(da.from_array(xl, chunks=(2, 5, 3, 4)), 2, axis=-1).compute()
    np.testing.assert_array_equal(yl, cynorm.group_norm(xl, 2, axis=-1))
    np.testing.assert_array_equal(cd.instance_norm(d, weight=w, bias=b).compute(),
                                  cynorm.instance_norm(x, weight=w, bias=b))
    rm, rv = rng.standard_normal(8), rng.uniform(0.5, 2, 8)
    np.testing.assert_array_equal(cd.instance_norm(d, rm, rv, use_input_stats=False).compute(),
                                  cynorm.instance_norm(x, rm, rv, use_input_stats=False))
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        cd.group_norm(d, 3)
    with pytest.raises(ValueError, match="does not update running statistics"):
        cd.instance_norm(d, rm, rv)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        cd.instance_norm(d[:, :, :1, :1])


def test_errors(rng):
    d = da.from_array(rng.standard_normal((10, 4)), chunks=5)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        cd.batch_norm(d)
    with pytest.raises(ValueError, match="does not update"):
        cd.batch_norm(d, np.zeros(4), np.ones(4), training=True)
    with pytest.raises(ValueError, match="shape"):
        cd.batch_norm(d, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="more than 1 value"):
        cd.batch_norm(d[:1], training=True)
    with pytest.raises(ValueError, match="normalized_shape"):
        cd.layer_norm(d, 5)
    with pytest.raises(TypeError, match="complex"):
        cd.moments(d.astype(complex), 0)


def test_on_a_local_cluster_of_processes(rng):
    distributed = optional("distributed")
    x = hostile(rng, (6000, 12), np.float32, offset=1e3)
    d = da.from_array(x, chunks=(700, 5))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        # dask's workers run with OMP_NUM_THREADS=1, and so do cynorm's kernels in them
        assert set(client.run(cynorm.get_num_threads).values()) == {1}
        got = cd.moments(d, 0)
        y = cd.batch_norm(d, training=True).compute()
        z = cd.layer_norm(d, 12).compute()
    want = cynorm.moments(x, 0)
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-15)
    np.testing.assert_allclose(got.var(), want.var(), rtol=1e-12)
    np.testing.assert_allclose(y, cynorm.batch_norm(x, training=True), atol=2e-6)
    np.testing.assert_array_equal(z, cynorm.layer_norm(x, 12))
