"""cynorm.Moments and cynorm.moments: accuracy, exact merges, masks, state, errors."""
import threading
from fractions import Fraction

import numpy as np
import pytest

import cynorm
from conftest import half_dtype, hostile, reference_moments

# (shape, reduced axes): BatchNorm1d / 2d layouts, feature-last, features split around the
# reduced axes (a copy), everything, a single long row
CASES = [((500, 7), (0,)), ((40, 6, 90), (0, 2)), ((40, 6, 5), (0, 2)), ((6, 4, 9, 11), (0, 2, 3)),
         ((16, 30, 12), (0, 1)), ((5, 6, 7, 8), (1, 3)), ((5, 6, 7, 8), (0, 2)), ((300, 4), None),
         ((3, 20000), (1,)), ((2, 3, 4), ()), ((7, 5), (-1,))]


def check_moments(m, x, axes, mask=None, dtype=np.float64):
    count, mean, var = reference_moments(x, tuple(range(np.ndim(x))) if axes is None else axes,
                                         mask)
    assert m.shape == np.shape(mean)
    assert m.count.dtype == m.mean.dtype == m.m2.dtype == np.float64
    np.testing.assert_array_equal(m.count, count)
    sd = np.sqrt(var)
    # the mean to float64 resolution of itself, the variance to 1e-12 (exact float64 sums
    # of float32 data leave only float64 rounding)
    assert np.all(np.abs(m.mean - mean) <= 4e-16 * np.abs(mean) + 1e-13 * sd)
    assert np.all(np.abs(m.var() - var) <= 1e-12 * var + 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axes", CASES)
def test_accuracy_every_layout(rng, dtype, shape, axes):
    x = hostile(rng, shape, dtype)
    m = cynorm.moments(x, axes)
    check_moments(m, x, axes)
    np.testing.assert_allclose(m.var(1), np.var(x.astype(np.float64), axis=axes, ddof=1)
                               if np.size(x) // max(m.count.size, 1) > 1 else np.nan,
                               rtol=1e-9)


@pytest.mark.parametrize("order", ["F", "strided", "negative", "readonly"])
def test_memory_layouts(rng, order):
    base = hostile(rng, (64, 9, 40))
    x = {"F": np.asfortranarray(base), "strided": base[::2, ::2, ::3],
         "negative": base[::-1, :, ::-2], "readonly": base.copy()}[order]
    if order == "readonly":
        x.flags.writeable = False
    check_moments(cynorm.moments(x, (0, 2)), x, (0, 2))


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.uint8, np.bool_, ">f8"])
def test_dtype_policy(rng, dtype):
    x = (rng.standard_normal((50, 3)) * 10).astype(dtype)
    check_moments(cynorm.moments(x, 0), x, (0,))


def test_rejects_unsupported_dtypes():
    with pytest.raises(TypeError, match="complex128"):
        cynorm.moments(np.ones((4, 2), complex))
    with pytest.raises(TypeError):
        cynorm.moments(np.array([["a", "b"]]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_of_any_split_equals_the_whole(rng, dtype):
    x = hostile(rng, (997, 5), dtype, offset=1e6, scale=rng.choice([1e-3, 1.0, 7.0]))
    for _ in range(5):
        cuts = np.sort(rng.integers(0, len(x) + 1, size=rng.integers(1, 8)))
        parts = [cynorm.moments(p, 0) for p in np.split(x, cuts)]  # empty parts included
        total = cynorm.Moments.zeros(5)
        for i in rng.permutation(len(parts)):  # in any order
            total = total + parts[i]
        check_moments(total, x, (0,))
        # a tree of merges gives the same as a left fold
        while len(parts) > 1:
            parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        check_moments(parts[0], x, (0,))


def test_merge_of_single_rows(rng):
    x = hostile(rng, (200, 3), offset=1e4)
    total = cynorm.Moments.zeros((3,))
    for row in x:
        total += cynorm.moments(row[None], 0)
    check_moments(total, x, (0,))


def test_merge_with_distant_parts(rng):
    # parts whose means differ by far more than their spread
    a = 1e8 + rng.standard_normal((300, 2))
    b = -1e8 + 1e-3 * rng.standard_normal((100, 2))
    x = np.concatenate([a, b])
    m = cynorm.moments(a, 0).merge(cynorm.moments(b, 0))
    check_moments(m, x, (0,))


def exact_row_moments(row):
    """The exact mean (a fraction) and M2 (a fraction) of a float64 row."""
    xs = [Fraction(v) for v in row.tolist()]
    mean = sum(xs) / len(xs)
    return mean, sum((v - mean) ** 2 for v in xs)


def outlier_rows(rng, shape, dt, sigmas=1e3):
    """Rows (the last axis) whose first element, and the first of their second block of the
    kernels' sums (element 2048), lie some 1e3 standard deviations from the rest, on either
    side: the shift of those blocks' sums, far from their means.  Exact in dt."""
    off = rng.choice([0.0, 30.0])
    x = off + rng.standard_normal(shape)
    for j in (0, 2048):
        if j < shape[-1]:
            x[..., j] = off + sigmas * rng.choice([-1.0, 1.0], shape[:-1])
    return x.astype(np.float32).astype(dt)


@pytest.mark.parametrize("name", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("D", [9, 700, 2049, 5000])
def test_outlier_first_element_keeps_float64_accuracy(rng, name, D):
    """A block whose shift (its first element) lies far from its mean lost up to
    (x[0] - mean)² / var ulps of M2, up to the block's length here (relative 3e-13 with 4096
    elements, where torch's float64 var_mean is good to 1e-14): it is summed again about its
    mean.  M2 within 256 float64 ulps of the exact value (the far element's square leaves the
    sums' own rounding up to some 70 ulps of M2 here), rstd within 128, the mean within 16
    ulps of the standard deviation, for rows (moments, LayerNorm's statistics) and
    BatchNorm's rows of (N, C, L); 16-bit rows the same bits as their float32 copy.  The build
    before failed 9 to 12 of the 16 cases (every one whose blocks' shift lay far enough)."""
    dt = np.dtype(name) if name in ("float64", "float32") else half_dtype(name)
    x = outlier_rows(rng, (4, D), dt)
    x64 = x.astype(np.float64)
    m = cynorm.moments(x, axis=1)
    _, ln_mean, ln_rstd = cynorm.layer_norm(x, (D,), return_stats=True, eps=0.0)
    bn = cynorm.moments(x.reshape(2, 2, D), axis=(0, 2))   # (N, C, L): BatchNorm's rows
    for i in range(4):
        mean, m2 = exact_row_moments(x64[i])
        sd = float(m2 / D) ** 0.5
        assert abs(Fraction(float(m.mean[i])) - mean) <= 16 * 2.0 ** -53 * sd
        assert abs(Fraction(float(m.m2[i])) - m2) <= 256 * 2.0 ** -53 * m2
        assert abs(Fraction(float(ln_mean.ravel()[i])) - mean) <= 16 * 2.0 ** -53 * sd
        assert abs(float(ln_rstd.ravel()[i]) * sd - 1) <= 128 * 2.0 ** -53
    for c in range(2):
        mean, m2 = exact_row_moments(x64.reshape(2, 2, D)[:, c].ravel())
        sd = float(m2 / (2 * D)) ** 0.5
        assert abs(Fraction(float(bn.mean[c])) - mean) <= 16 * 2.0 ** -53 * sd
        assert abs(Fraction(float(bn.m2[c])) - m2) <= 256 * 2.0 ** -53 * m2
    if dt.itemsize == 2:
        x32 = x.astype(np.float32)
        assert m.m2.tobytes() == cynorm.moments(x32, axis=1).m2.tobytes()
        _, mean32, rstd32 = cynorm.layer_norm(x32, (D,), return_stats=True, eps=0.0)
        assert ln_mean.tobytes() == mean32.tobytes() and ln_rstd.tobytes() == rstd32.tobytes()


@pytest.mark.parametrize("shape,axes,mshape", [((30, 20, 6), (0, 1), (30, 20)),
                                               ((8, 5, 70), (0, 2), (8, 70)),
                                               ((40, 3), (0,), (40,))])
def test_mask_counts_marked_positions_only(rng, shape, axes, mshape):
    x = hostile(rng, shape, np.float32)
    mask = rng.random(mshape) < 0.6
    x_pad = x.copy()
    keep_x = np.moveaxis(x_pad, [a for a in range(x.ndim) if a not in axes],
                         list(range(len(axes), x.ndim)))
    keep_x[~mask] = np.float32(1e30)  # garbage where the mask says padding
    m = cynorm.moments(x_pad, axes, mask=mask)
    check_moments(m, x, axes, mask)


def test_empty_and_all_masked_give_the_empty_accumulator(rng):
    for m in (cynorm.moments(np.empty((0, 4)), 0),
              cynorm.moments(rng.standard_normal((5, 4)), 0, mask=np.zeros(5, bool))):
        np.testing.assert_array_equal(m.count, 0)
        assert np.isnan(m.mean).all() and np.isnan(m.var()).all()
        x = rng.standard_normal((9, 4))
        check_moments(m + cynorm.moments(x, 0), x, (0,))
    assert cynorm.moments(np.empty((5, 0)), 0).shape == (0,)


def test_var_correction_and_std(rng):
    x = rng.standard_normal((10, 3))
    m = cynorm.moments(x, 0)
    np.testing.assert_allclose(m.var(1), x.var(0, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(m.std(), x.std(0), rtol=1e-13)
    one = cynorm.moments(x[:1], 0)
    np.testing.assert_array_equal(one.var(), 0.0)
    assert np.isnan(one.var(1)).all()  # no division-by-zero warning either
    with pytest.raises(TypeError):
        m.var("1")


def test_nan_propagates(rng):
    x = rng.standard_normal((100, 3))
    x[7, 1] = np.nan
    m = cynorm.moments(x, 0)
    assert np.isnan(m.mean[1]) and np.isnan(m.var()[1])
    assert np.isfinite(m.mean[[0, 2]]).all()


def test_state_round_trip(rng, tmp_path):
    x = hostile(rng, (100, 2, 3), offset=1e6)
    m = cynorm.moments(x, 0)
    d = m.to_dict()
    assert set(d) == {"count", "mean", "mean_lo", "m2"}
    back = cynorm.Moments.from_dict(d)
    for k, v in back.to_dict().items():
        np.testing.assert_array_equal(v, d[k])
    d["count"][...] = -5  # to_dict hands out copies
    assert m.count.min() == 100
    path = tmp_path / "stats.npz"
    m.save(path)
    loaded = cynorm.Moments.load(path)
    np.testing.assert_array_equal(loaded.mean, m.mean)
    np.testing.assert_array_equal(loaded.var(), m.var())
    # without mean_lo (someone else's file): accepted, the remainder taken as 0
    plain = cynorm.Moments.from_dict({"count": m.count, "mean": m.mean, "m2": m.m2})
    np.testing.assert_allclose(plain.var(), m.var(), rtol=1e-15)


def test_load_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, count=np.array([1.0]), mean=np.array([object()], dtype=object),
             m2=np.array([0.0]))
    with pytest.raises(ValueError, match="pickle"):
        cynorm.Moments.load(path)


@pytest.mark.parametrize("state,error,match", [
    ({"count": [1.0], "mean": [0.0]}, KeyError, "missing"),
    ({"count": [1.0], "mean": [0.0], "m2": [0.0], "extra": [1]}, KeyError, "unexpected"),
    ({"count": [1.0, 2.0], "mean": [0.0], "m2": [0.0]}, ValueError, "shape"),
    ({"count": [-1.0], "mean": [0.0], "m2": [0.0]}, ValueError, "count"),
    ({"count": [1.5], "mean": [0.0], "m2": [0.0]}, ValueError, "count"),
    ({"count": [np.nan], "mean": [0.0], "m2": [0.0]}, ValueError, "count"),
    ({"count": [2.0], "mean": [0.0], "m2": [-1.0]}, ValueError, "m2"),
    ({"count": [2.0], "mean": ["a"], "m2": [1.0]}, TypeError, "mean"),
])
def test_from_dict_rejects_bad_state(state, error, match):
    with pytest.raises(error, match=match):
        cynorm.Moments.from_dict(state)


def test_errors(rng):
    a = cynorm.moments(rng.standard_normal((5, 3)), 0)
    with pytest.raises(ValueError, match="feature shape"):
        a.merge(cynorm.moments(rng.standard_normal((5, 4)), 0))
    with pytest.raises(TypeError):
        a.merge(np.ones(3))
    with pytest.raises(TypeError):
        a + 1  # noqa: B018
    x = rng.standard_normal((4, 5, 6))
    with pytest.raises(ValueError, match="duplicate"):
        cynorm.moments(x, (0, 0))
    with pytest.raises(np.exceptions.AxisError):
        cynorm.moments(x, 3)
    with pytest.raises(TypeError, match="axis"):
        cynorm.moments(x, 1.5)
    with pytest.raises(ValueError, match="mask"):
        cynorm.moments(x, (0, 1), mask=np.ones((4, 6), bool))
    with pytest.raises(TypeError, match="bool"):
        cynorm.moments(x, (0, 1), mask=np.ones((4, 5)))


def test_thread_count_does_not_change_the_answer(rng):
    x = hostile(rng, (1 << 16, 12), np.float32)
    with cynorm.num_threads(1):
        one = cynorm.moments(x, 0)
    with cynorm.num_threads(2):
        two = cynorm.moments(x, 0)
    # the same to float64 rounding (the parts are summed in another order)
    assert np.all(np.abs(two.mean - one.mean) <= 4e-16 * np.abs(one.mean) + 1e-14 * one.std())
    np.testing.assert_allclose(two.var(), one.var(), rtol=1e-13)


def test_concurrent_calls(rng):
    xs = [hostile(rng, (5000, 8)) for _ in range(4)]
    expected = [cynorm.moments(x, 0).var() for x in xs]
    results = [None] * 4

    def work(i):
        for _ in range(20):
            results[i] = cynorm.moments(xs[i], 0).var()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)
