"""cynorm.sklearn.BatchNormScaler: sklearn's estimator checks, StandardScaler equivalence."""
import numpy as np
import pytest

from conftest import hostile, reference_moments, optional

optional("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from cynorm.sklearn import BatchNormScaler  # noqa: E402


@parametrize_with_checks([BatchNormScaler(), BatchNormScaler(eps=0.0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eps_zero_is_standard_scaler(rng, dtype):
    x = hostile(rng, (400, 6), dtype, offset=1e3)
    x[:, 2] = 5.0  # a constant column: centered, not scaled
    ours = BatchNormScaler(eps=0.0).fit(x)
    theirs = StandardScaler().fit(x.astype(np.float64))
    _, mean, var = reference_moments(x, (0,))
    np.testing.assert_allclose(ours.mean_, mean, rtol=1e-15)
    np.testing.assert_allclose(ours.var_, var, rtol=1e-12, atol=1e-300)
    y = ours.transform(x)
    assert y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(y, theirs.transform(x.astype(np.float64)), atol=tol)
    np.testing.assert_array_equal(ours.scale_[2], 1.0)


def test_transform_is_batch_norm_with_fitted_statistics(rng):
    x = hostile(rng, (1000, 5), np.float64, offset=1e4)
    sc = BatchNormScaler(eps=1e-3).fit(x)
    _, mean, var = reference_moments(x, (0,))
    want = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(sc.transform(x), want, atol=1e-11)
    np.testing.assert_allclose(sc.fit_transform(x), want, atol=1e-11)


def test_partial_fit_over_batches_equals_fit(rng):
    x = hostile(rng, (999, 4), np.float32, offset=1e6)
    whole = BatchNormScaler().fit(x)
    streamed = BatchNormScaler()
    for part in np.array_split(x, 7):
        streamed.partial_fit(part)
    assert streamed.n_samples_seen_ == whole.n_samples_seen_ == 999
    np.testing.assert_allclose(streamed.mean_, whole.mean_, rtol=1e-15)
    np.testing.assert_allclose(streamed.var_, whole.var_, rtol=1e-12)


def test_inverse_transform_round_trip_and_copy(rng):
    x = hostile(rng, (200, 3), np.float64, offset=1e2)
    sc = BatchNormScaler().fit(x)
    np.testing.assert_allclose(sc.inverse_transform(sc.transform(x)), x, rtol=1e-12)
    buf = x.copy()
    out = BatchNormScaler(copy=False).fit(buf).transform(buf)
    assert out is buf  # written in place
    np.testing.assert_allclose(buf, sc.transform(x), atol=1e-12)
    kept = x.copy()
    sc.transform(kept)
    np.testing.assert_array_equal(kept, x)  # copy=True leaves X alone


def test_in_a_pipeline(rng):
    x = hostile(rng, (300, 8), np.float64, offset=1e3)
    pipe = make_pipeline(BatchNormScaler(eps=0.0), PCA(n_components=3))
    ref = make_pipeline(StandardScaler(), PCA(n_components=3))
    z, zr = pipe.fit_transform(x), ref.fit_transform(x)
    np.testing.assert_allclose(np.abs(z), np.abs(zr), atol=1e-8)  # component signs are free
    params = pipe.get_params()
    assert params["batchnormscaler__eps"] == 0.0
    pipe.set_params(batchnormscaler__eps=1e-2)
    assert clone(pipe).get_params()["batchnormscaler__eps"] == 1e-2


def test_rejects_bad_input(rng):
    sc = BatchNormScaler().fit(rng.standard_normal((10, 3)))
    with pytest.raises(ValueError, match="features"):
        sc.transform(rng.standard_normal((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        BatchNormScaler().fit(np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="eps"):
        BatchNormScaler(eps=-1.0).fit(np.ones((3, 2)))
