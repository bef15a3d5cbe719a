import numpy as np
import pytest

import cynorm
from conftest import TOL, batch_statistics, hostile, max_err

DTYPES = [np.float32, np.float64]
# (shape, feature axis): (N, C), (N, C, L) short and long L, (N, C, H, W), (N, T, C) feature-last,
# a middle axis, and few rows with many features.
LAYOUTS = [((5, 10), 1), ((4096, 64), 1), ((64, 8, 5), 1), ((32, 16, 300), 1),
           ((4, 3, 9, 11), 1), ((8, 50, 32), -1), ((6, 5, 7, 3), 2), ((3, 5000), 1),
           ((2, 4, 70), -1), ((300, 2), 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_training_accuracy(rng, ref_batch_norm, dtype, offset, shape, axis):
    x = hostile(rng, shape, dtype, offset=offset, scale=rng.choice([1e-2, 1.0, 50.0]))
    y = cynorm.batch_norm(x, training=True, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_err(y, ref_batch_norm(x, axis)) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_running_update_and_affine(rng, ref_batch_norm, dtype, shape, axis):
    x = hostile(rng, shape, dtype)
    C = shape[axis]
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.uniform(-1, 1, C).astype(dtype)
    rm0 = rng.standard_normal(C).astype(dtype)
    rv0 = rng.uniform(0.5, 2, C).astype(dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y = cynorm.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3, axis=axis)
    assert max_err(y, ref_batch_norm(x, axis, w, b, 1e-3)) <= 4 * TOL[np.dtype(dtype)]
    mean, var = batch_statistics(x, axis)
    n = x.size // C
    rtol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(rm, 0.7 * rm0 + 0.3 * mean, rtol=rtol, atol=rtol * np.abs(mean).max())
    np.testing.assert_allclose(rv, 0.7 * rv0 + 0.3 * var * n / (n - 1), rtol=rtol * 10)
    # eval: normalizes with the running statistics
    y_eval = cynorm.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3, axis=axis)
    ref = ref_batch_norm(x, axis, w, b, 1e-3, mean=rm.astype(np.float64), var=rv)
    assert max_err(y_eval, ref) <= 1e-4 * max(1.0, np.abs(ref).max()) if dtype == np.float32 \
        else max_err(y_eval, ref) <= 1e-10 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch_functional(rng, torch, dtype):
    F = torch.nn.functional
    for shape in [(5, 10), (16, 3, 40), (4, 6, 90), (3, 4, 5, 6)]:
        x = rng.standard_normal(shape).astype(dtype) * 3 + 1
        C = shape[1]
        w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        trm, trv = torch.zeros(C, dtype=torch.from_numpy(x).dtype), torch.ones(C, dtype=torch.from_numpy(x).dtype)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for step in range(3):
            xs = x + step
            got = cynorm.batch_norm(xs, rm, rv, w, b, training=True, momentum=0.2)
            expect = F.batch_norm(torch.from_numpy(xs), trm, trv, torch.from_numpy(w),
                                  torch.from_numpy(b), training=True, momentum=0.2).numpy()
            np.testing.assert_allclose(got, expect, atol=tol * 10)
            np.testing.assert_allclose(rm, trm.numpy(), atol=tol, rtol=tol)
            np.testing.assert_allclose(rv, trv.numpy(), atol=tol, rtol=tol)
        got = cynorm.batch_norm(x, rm, rv, w, b, training=False)
        expect = F.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                              torch.from_numpy(b), training=False).numpy()
        np.testing.assert_allclose(got, expect, atol=tol * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, C", [(40, 4128), (8, 16400), (1100, 1100)])
def test_eval_few_rows_of_many_features(rng, torch, dtype, rows, C):
    """Eval with no more rows than features (the threads split the features: each makes its
    columns' parameters): torch's result, one thread's bits, with a mask and with out=."""
    x = (rng.standard_normal((rows, C)) * 3 + 1e3).astype(dtype)
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm = (rng.standard_normal(C) + 1e3).astype(dtype)
    rv = rng.uniform(1, 4, C).astype(dtype)
    with cynorm.num_threads(1):
        y1 = cynorm.batch_norm(x, rm, rv, w, b, training=False)
    with cynorm.num_threads(2):
        y2 = cynorm.batch_norm(x, rm, rv, w, b, training=False)
        out = np.full_like(x, np.nan)
        assert cynorm.batch_norm(x, rm, rv, w, b, training=False, out=out) is out
        keep = rng.random(rows) < 0.7
        ym = cynorm.batch_norm(x[None], rm, rv, w, b, training=False, axis=-1,
                               mask=keep[None])[0]
    expect = torch.nn.functional.batch_norm(
        *(torch.from_numpy(a.astype(np.float64)) for a in (x, rm, rv, w, b)),
        training=False).numpy()
    assert max_err(y1, expect) <= TOL[np.dtype(dtype)] * 10
    assert y1.tobytes() == y2.tobytes() == out.tobytes()
    assert ym[keep].tobytes() == y1[keep].tobytes()
    assert not ym[~keep].any()


def test_feature_last_matches_torch_on_moved_axis(rng, torch):
    x = rng.standard_normal((8, 20, 12)).astype(np.float32)
    rm, rv = np.zeros(12, np.float32), np.ones(12, np.float32)
    trm, trv = torch.zeros(12), torch.ones(12)
    got = cynorm.batch_norm(x, rm, rv, training=True, axis=-1)
    expect = torch.nn.functional.batch_norm(torch.from_numpy(x).permute(0, 2, 1), trm, trv,
                                            training=True).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)
    np.testing.assert_allclose(rm, trm.numpy(), atol=1e-6)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-5)


def test_more_accurate_than_torch_far_from_zero(rng, torch, ref_batch_norm):
    x = (1e6 + rng.standard_normal((4096, 64))).astype(np.float32)
    ref = ref_batch_norm(x, 1)
    err_torch = max_err(torch.nn.functional.batch_norm(torch.from_numpy(x), None, None,
                                                       training=True).numpy(), ref)
    err_cynorm = max_err(cynorm.batch_norm(x, training=True), ref)
    assert err_cynorm <= 1e-5 < err_torch


def test_errors_like_torch(rng):
    x = rng.standard_normal((5, 10))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        cynorm.batch_norm(x[:1], training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        cynorm.batch_norm(rng.standard_normal((1, 3, 1)), training=True)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        cynorm.batch_norm(x, training=True, eps=0.0)
    with pytest.raises(ValueError, match="must be given when not training"):
        cynorm.batch_norm(x, training=False)
    with pytest.raises(ValueError, match="running_mean should contain 10 elements not 3"):
        cynorm.batch_norm(x, np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError, match="weight"):
        cynorm.batch_norm(x, training=True, weight=np.ones(4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        cynorm.batch_norm(np.ones(10), training=True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        cynorm.batch_norm(np.ones(10), np.zeros(10), np.ones(10))
    with pytest.raises(ValueError, match="eps must be positive during training"):
        cynorm.batch_norm(np.empty(0), training=True, eps=0.0)
    with pytest.raises(TypeError, match="unsupported dtype"):
        cynorm.batch_norm(np.empty(0, complex), training=True)
    with pytest.raises(np.exceptions.AxisError):
        cynorm.batch_norm(x, training=True, axis=2)
    with pytest.raises(TypeError, match="ndarray"):
        cynorm.batch_norm(x, [0.0] * 10, [1.0] * 10, training=True)
    with pytest.raises(TypeError, match="dtype"):
        cynorm.batch_norm(x.astype(complex), training=True)
    with pytest.raises(TypeError, match="floating"):
        cynorm.batch_norm(x, np.zeros(10, int), np.ones(10, int), training=True)


def test_failed_call_leaves_buffers_unchanged(rng):
    rm, rv = np.full(10, 0.5), np.full(10, 2.0)
    ro = np.ones(10)
    ro.flags.writeable = False
    for kwargs in ({"x": rng.standard_normal((1, 10))},
                   {"x": rng.standard_normal((5, 10)), "eps": -1.0},
                   {"x": rng.standard_normal((5, 10)), "weight": np.ones(3)},
                   {"x": rng.standard_normal((5, 10)), "running_var": ro}):
        kwargs.setdefault("running_var", rv)
        with pytest.raises((ValueError, TypeError)):
            cynorm.batch_norm(running_mean=rm, training=True, **kwargs)
        assert (rm == 0.5).all() and (rv == 2.0).all()


def test_eval_without_training_checks(rng):
    # eval has no "one value per channel" check and accepts eps = 0
    x = rng.standard_normal((1, 4))
    y = cynorm.batch_norm(x, np.zeros(4), np.ones(4), training=False, eps=0.0)
    np.testing.assert_allclose(y, x, rtol=1e-15)
    assert cynorm.batch_norm(np.empty((0, 4)), np.zeros(4), np.ones(4)).shape == (0, 4)


def test_zero_variance_eps_zero_is_nan_like_torch(rng, torch):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    expect = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.zeros(3), torch.zeros(3),
                                            training=False, eps=0.0).numpy()
    got = cynorm.batch_norm(x, np.zeros(3, np.float32), np.zeros(3, np.float32), eps=0.0)
    assert np.isnan(expect).all() and np.isnan(got).all()


def test_constant_feature_gives_bias(rng):
    x = rng.standard_normal((50, 4))
    x[:, 2] = 3.0
    y = cynorm.batch_norm(x, training=True, bias=np.arange(4.0))
    assert (y[:, 2] == 2.0).all()


def test_nan_stays_in_its_feature(rng):
    x = rng.standard_normal((200, 6))
    x[17, 1] = np.nan
    x[3, 4] = -np.inf
    for axis_x, axis in ((x, 1), (np.ascontiguousarray(x.T[None]), 1)):
        y = cynorm.batch_norm(axis_x, training=True, axis=axis)
        y = y if y.ndim == 2 else y[0].T
        assert np.isnan(y[:, 1]).all() and np.isnan(y[:, 4]).all()
        assert np.isfinite(y[:, [0, 2, 3, 5]]).all()


@pytest.mark.parametrize("dtype,result", [(np.float16, np.float16), (np.int16, np.float64),
                                          (np.bool_, np.float64), (">f8", np.float64)])
def test_dtype_policy(rng, ref_batch_norm, dtype, result):
    x = (rng.standard_normal((64, 5)) * 3).astype(dtype)
    y = cynorm.batch_norm(x, training=True)
    assert y.dtype == np.dtype(result)
    tol = 3e-3 if result == np.float16 else 1e-12
    assert max_err(y, ref_batch_norm(x.astype(np.float64), 1)) <= tol


def test_buffers_of_another_dtype_are_updated_in_place(rng):
    x = rng.standard_normal((30, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float64), np.ones(3, np.float64)
    cynorm.batch_norm(x, rm, rv, training=True, momentum=1.0)
    mean, var = batch_statistics(x)
    np.testing.assert_allclose(rm, mean, atol=1e-7)
    np.testing.assert_allclose(rv, var * 30 / 29, rtol=1e-6)


@pytest.mark.parametrize("x_dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("buf_dtype", [np.float16, np.float32, np.float64, np.longdouble])
@pytest.mark.parametrize("shape,axis", [((40, 3), 1), ((6, 3, 80), 1), ((5, 9, 3), -1)])
def test_running_buffers_of_every_float_dtype(rng, x_dtype, buf_dtype, shape, axis):
    """The update is computed in float64 from the float64 batch statistics and rounded once
    into the buffers' dtype, whatever the input's dtype; the output is as with float64 ones."""
    x = hostile(rng, shape, x_dtype, offset=3.0, scale=2.0)
    C = shape[axis]
    rm0, rv0 = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    rm, rv = rm0.astype(buf_dtype), rv0.astype(buf_dtype)
    momentum = 0.3
    _, mean, invstd = cynorm.batch_norm(x, training=True, axis=axis, return_stats=True)
    y = cynorm.batch_norm(x, rm, rv, training=True, momentum=momentum, axis=axis)
    assert rm.dtype == buf_dtype and rv.dtype == buf_dtype and y.dtype == x_dtype
    np.testing.assert_array_equal(y, cynorm.batch_norm(x, training=True, axis=axis))
    n = x.size // C
    var = 1.0 / invstd.astype(np.float64) ** 2 - 1e-5
    want_m = ((1 - momentum) * rm0.astype(buf_dtype).astype(np.float64) + momentum * mean)
    want_v = ((1 - momentum) * rv0.astype(buf_dtype).astype(np.float64)
              + momentum * var * n / (n - 1))
    # rounded once: within half a unit in the last place of the buffer's dtype
    tol = np.finfo(buf_dtype).eps if buf_dtype != np.longdouble else 1e-14
    np.testing.assert_allclose(rm.astype(np.float64), want_m, rtol=tol, atol=1e-12)
    # (the variance recovered from invstd carries its own rounding)
    np.testing.assert_allclose(rv.astype(np.float64), want_v, rtol=max(tol, 1e-12))
    if buf_dtype == np.float16:  # exactly the float64 update rounded to float16
        np.testing.assert_array_equal(rm, want_m.astype(np.float16))


def test_matches_torch_with_float16_buffers(rng, torch):
    x = (rng.standard_normal((64, 4)) * 3 + 2).astype(np.float16)
    rm, rv = np.zeros(4, np.float16), np.ones(4, np.float16)
    trm, trv = torch.zeros(4, dtype=torch.float16), torch.ones(4, dtype=torch.float16)
    for _ in range(3):
        y = cynorm.batch_norm(x, rm, rv, training=True)
        ty = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True)
        np.testing.assert_allclose(y.astype(np.float32), ty.numpy().astype(np.float32),
                                   atol=4e-3)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-3)


@pytest.mark.parametrize("shape,axis", [((0, 4), 1), ((0, 4, 7), 1), ((0, 6, 4), -1),
                                        ((3, 4, 0), 1)])
def test_empty_batch_in_training_like_torch(rng, torch, shape, axis):
    """An empty batch: an empty output, the running statistics unchanged (torch 2.13)."""
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    before = rm.copy(), rv.copy()
    y = cynorm.batch_norm(np.empty(shape, np.float32), rm, rv, training=True, axis=axis)
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    if axis == 1:
        trm, trv = torch.from_numpy(before[0].copy()), torch.from_numpy(before[1].copy())
        ty = torch.nn.functional.batch_norm(torch.empty(shape), trm, trv, training=True)
        assert tuple(ty.shape) == y.shape
        np.testing.assert_array_equal(trm.numpy(), rm)
    with pytest.raises(ValueError, match="eps must be positive"):
        cynorm.batch_norm(np.empty(shape), training=True, eps=0.0, axis=axis)
    mask = np.ones(shape[:-1], bool)
    if axis == -1:  # with a mask: still an empty batch, not "all padding"
        assert cynorm.batch_norm(np.empty(shape), training=True, axis=-1,
                                 mask=mask).shape == shape


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,result", [(np.float32, np.float32), (np.float16, np.float16),
                                          (np.int64, np.float64)])
def test_one_dimensional_empty_input_like_torch(torch, training, dtype, result):
    x = np.empty(0, dtype)
    for buffers in ((None, None), (np.zeros(3), np.ones(3))):
        if not training and buffers[0] is None:
            continue
        y = cynorm.batch_norm(x, *buffers, training=training)
        assert y.shape == (0,) and y.dtype == result
        ty = torch.nn.functional.batch_norm(
            torch.empty(0), *(None if b is None else torch.from_numpy(b) for b in buffers),
            training=training)
        assert tuple(ty.shape) == y.shape
    y, mean, invstd = cynorm.batch_norm(x, np.zeros(3), np.ones(3), training=training,
                                        return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(np.empty(0), x, mean, invstd, np.ones(3), training,
                                            bias=np.zeros(3))
    assert dx.shape == (0,) and dx.dtype == result
    assert (dw == 0).all() and (db == 0).all() and dw.shape == (3,)


@pytest.mark.parametrize("layout", ["fortran", "slice", "negative", "readonly", "unaligned"])
@pytest.mark.parametrize("shape,axis", [((40, 6), 1), ((10, 4, 100), 1), ((6, 30, 5), -1)])
def test_layouts(rng, ref_batch_norm, layout, shape, axis):
    base = hostile(rng, tuple(2 * s for s in shape), np.float64)
    if layout == "fortran":
        x = np.asfortranarray(base[tuple(slice(0, s) for s in shape)])
    elif layout == "slice":
        x = base[tuple(slice(0, 2 * s, 2) for s in shape)]
    elif layout == "negative":
        x = base[tuple(slice(None, None, -2) for _ in shape)]
    elif layout == "readonly":
        x = base[tuple(slice(0, s) for s in shape)].copy()
        x.flags.writeable = False
    else:
        src = base[tuple(slice(0, s) for s in shape)]
        buf = np.zeros(src.nbytes + 3, np.uint8)
        x = buf[3:].view(np.float64).reshape(shape)
        x[...] = src
    before = x.copy()
    y = cynorm.batch_norm(x, training=True, axis=axis)
    assert max_err(y, ref_batch_norm(before, axis)) <= 1e-12
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("shape,axis", [((64, 7), 1), ((8, 3, 200), 1), ((5, 9, 4), -1)])
def test_out_and_in_place(rng, ref_batch_norm, shape, axis):
    x = hostile(rng, shape, np.float32)
    ref = ref_batch_norm(x, axis)
    out = np.empty_like(x)
    assert cynorm.batch_norm(x, training=True, axis=axis, out=out) is out
    assert max_err(out, ref) <= 1e-5
    y = x.copy()
    assert cynorm.batch_norm(y, training=True, axis=axis, out=y) is y
    assert max_err(y, ref) <= 1e-5
    f = np.asfortranarray(np.zeros_like(x))
    cynorm.batch_norm(x, training=True, axis=axis, out=f)
    assert max_err(f, ref) <= 1e-5
    with pytest.raises(ValueError, match="shape"):
        cynorm.batch_norm(x, training=True, axis=axis, out=np.empty(x.shape[::-1], np.float32))
    with pytest.raises(TypeError, match="dtype"):
        cynorm.batch_norm(x, training=True, axis=axis, out=np.empty(x.shape))


@pytest.mark.parametrize("shape,axis", [((20000, 16), 1), ((64, 8, 600), 1), ((64, 80, 48), -1)])
def test_thread_count_invariance(rng, shape, axis):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = hostile(rng, shape, np.float32)
    rm_a, rv_a = np.zeros(shape[axis]), np.ones(shape[axis])
    rm_b, rv_b = rm_a.copy(), rv_a.copy()
    default = cynorm.batch_norm(x, rm_a, rv_a, training=True, axis=axis)
    with threadpoolctl.threadpool_limits(1, "openmp"):
        single = cynorm.batch_norm(x, rm_b, rv_b, training=True, axis=axis)
    # the merge order of partial moments differs: equal to rounding.  The (N, C) and (N, T, C)
    # layouts sum float32 rows in float32 groups of 16 (M2 good to ~1e-7), the (N, C, L) layout
    # in float64.
    np.testing.assert_allclose(default, single, atol=2e-6)
    f32_sweep = x.ndim == 2 or axis == -1
    x64 = x.astype(np.float64)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    sd = x64.std(axis=axes)
    assert np.all(np.abs(rm_a - rm_b) <= (1e-7 if f32_sweep else 1e-12) * 0.1 * sd + 1e-12)
    np.testing.assert_allclose(rv_a, rv_b, rtol=1e-6 if f32_sweep else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["sorted", "drift", "outlier_first", "two_levels"])
def test_accuracy_on_ordered_and_outlying_batches(rng, ref_batch_norm, dtype, pattern):
    # The column reduction shifts every block by the first block's mean: data whose first
    # block is unlike the rest must still come out right.
    n, C = 5000, 24
    x = 1e4 + rng.standard_normal((n, C))
    if pattern == "sorted":
        x = np.sort(x * 1e3, axis=0)
    elif pattern == "drift":
        x += np.linspace(0, 1e5, n)[:, None]
    elif pattern == "outlier_first":
        x[:64] = -1e6
    else:
        x[n // 2:] += 1e6
    x = x.astype(dtype)
    for layout, axis in ((x, 1), (np.ascontiguousarray(x.T)[None], 1)):
        y = cynorm.batch_norm(layout, training=True, axis=axis)
        assert max_err(y, ref_batch_norm(layout, axis)) <= TOL[np.dtype(dtype)]


def _float32_sweep_data(rng, pattern, n=4096, C=64):
    """float32 (n, C) data that hurts a float32 sum of scaled deviations."""
    x = rng.standard_normal((n, C))
    if pattern == "offset":        # mean 1e6 standard deviations from zero
        x = x + 1e6
    elif pattern == "sorted":
        x = np.sort(x * 5 + 3, axis=0)
    elif pattern == "first_block_apart":   # the first block 1000 sd from the rest
        x[:48] = 1000.0
    elif pattern == "tiny":        # squares of the unscaled deviations underflow float32
        x = x * 1e-30
    elif pattern == "huge":        # squares of the unscaled deviations overflow float32
        x = x * 1e36
    elif pattern == "constant_columns":
        x[:, 3], x[:, 5], x[:, 6] = 7.0, 0.0, -2.5e-30
    elif pattern == "zero_first_block":    # no scale from the first block: float64 sweep
        x[:200, :10] = 0.0
        x[200:, :10] *= 1e-25
    elif pattern == "later_rows_1e20":     # the scaled squares overflow: redone in float64
        x[2000:, 1] *= 1e20
    elif pattern == "later_rows_1e-30":
        x[48:, 1] *= 1e-30
    elif pattern == "subnormal":
        x = np.zeros((n, C))
        x[1000::97] = 1e-41
    elif pattern == "binary":
        x = (x > 0.5).astype(np.float64)
    return x.astype(np.float32)


@pytest.mark.parametrize("isa", ["selected", "baseline", "avx2", "avx512"])
@pytest.mark.parametrize("pattern", ["normal", "offset", "sorted", "first_block_apart", "tiny",
                                     "huge", "constant_columns", "zero_first_block",
                                     "later_rows_1e20", "later_rows_1e-30", "subnormal",
                                     "binary"])
def test_float32_sweep_statistics(rng, pattern, isa):
    # BatchNorm training sums float32 rows in float32 groups of 16 (scaled deviations from the
    # running mean, pyx/core/columns.pxi column_chunk_moments): its moments must stay within
    # float32 accuracy of the float64 reference on data chosen to break that, for every build.
    from cynorm import _isa
    module = _isa.kernels if isa == "selected" else _isa.load(isa)
    if module is None:
        pytest.skip(f"{isa} kernels not built or not runnable on this CPU")
    x = _float32_sweep_data(rng, pattern)
    n, C = x.shape
    x64 = x.astype(np.float64)
    m = x64.mean(axis=0)
    m2 = ((x64 - m) ** 2).sum(axis=0)
    sd = np.sqrt(m2 / n)
    for threads in (1, 2):
        fast, exact = np.empty((3, C)), np.empty((3, C))
        count = module.feature_moments(x, n, C, C, False, fast, threads, 48, None, True)
        assert count == module.feature_moments(x, n, C, C, False, exact, threads, 48) == n
        assert np.all(np.abs(fast[0] + fast[1] - m) <= 1e-7 * sd + 1e-300)
        # a few float32 ulps of Σ(x - s)², which a batch that changes regime part-way
        # (first_block_apart: 1.9e-7 at worst over 40 seeds) makes a few times M2
        assert np.all(np.abs(fast[2] - m2) <= 5e-7 * m2)
        assert np.all((fast[2] == 0) == (m2 == 0))


def test_float32_sweep_keeps_non_finite_values(rng):
    # inf / NaN in a block after the first: the float32 sweep's non-finite sums are redone in
    # float64, so the statistics (and the negative count that sends BatchNorm to its rescaled
    # path) are those of the float64 sweep.
    from cynorm._batch_norm import _kernels
    x = rng.standard_normal((4096, 16)).astype(np.float32)
    x[3000, 2], x[100, 4], x[2000, 7] = np.nan, np.inf, -np.inf
    x[:, 9] = 3e38
    x[::2, 9] = -3e38        # x - mean overflows float32
    fast, exact = np.empty((3, 16)), np.empty((3, 16))
    n_fast = _kernels.feature_moments(x, 4096, 16, 16, False, fast, 2, 48, None, True)
    n_exact = _kernels.feature_moments(x, 4096, 16, 16, False, exact, 2, 48)
    assert n_fast == n_exact == -4096
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(exact))
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(exact))
    y = cynorm.batch_norm(x, training=True)
    assert np.isnan(y[:, [2, 4, 7]]).all() and np.isfinite(np.delete(y, [2, 4, 7], 1)).all()


def test_float32_sweep_with_a_mask(rng, ref_batch_norm):
    x = (2 * rng.standard_normal((64, 80, 48)) + 1e3).astype(np.float32)
    mask = rng.random((64, 80)) < 0.4
    y, mean, invstd = cynorm.batch_norm(x, training=True, axis=-1, mask=mask,
                                        return_stats=True)
    real = x[mask].astype(np.float64)
    m = real.mean(axis=0)
    v = real.var(axis=0)
    assert np.all(np.abs(mean - m) <= 1e-7 * np.sqrt(v))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(v + 1e-5), rtol=2e-7)
    assert max_err(y[mask], (real - m) / np.sqrt(v + 1e-5)) <= 1e-5
    assert not y[~mask].any()


@pytest.mark.parametrize("kind", ["same", "float64", "list", "strided"])
def test_eval_with_running_statistics_of_any_kind(rng, ref_batch_norm, kind):
    x = hostile(rng, (40, 6, 3), np.float32, offset=1e3)
    mean, var = batch_statistics(x, 1)
    w, b = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    if kind == "same":
        rm, rv = mean.astype(np.float32), var.astype(np.float32)
    elif kind == "float64":
        rm, rv = mean, var
    elif kind == "list":
        rm, rv = list(mean), list(var)
    else:
        rm, rv = np.repeat(mean, 2)[::2], np.repeat(var, 2)[::2]
    y = cynorm.batch_norm(x, rm, rv, w, b, training=False)
    ref = ref_batch_norm(x, 1, w, b, mean=np.asarray(rm, np.float64), var=np.asarray(rv, np.float64))
    assert max_err(y, ref) <= 1e-4 * np.abs(ref).max()


def test_reversed_single_column_view(rng, ref_batch_norm, ref_layer_norm):
    # A reversed view one element wide has a row stride of -1 element: a legal stride, once
    # mistaken for an error code by the kernels (found by the property tests).
    base = hostile(rng, (7, 1), np.float32)
    x = base[::-1]
    assert x.strides[0] == -4
    assert max_err(cynorm.batch_norm(x, training=True), ref_batch_norm(x, 1)) <= 1e-5
    eval_ref = x.astype(np.float64) / np.sqrt(1 + 1e-5)
    assert max_err(cynorm.batch_norm(x, np.zeros(1), np.ones(1)), eval_ref) <= \
        1e-6 * np.abs(eval_ref).max()
    assert max_err(cynorm.layer_norm(x, 1, bias=np.ones(1)), np.ones((7, 1))) == 0
