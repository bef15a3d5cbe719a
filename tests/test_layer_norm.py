import numpy as np
import pytest

import cynorm
from conftest import TOL, hostile, max_err

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape,nshape", [((5, 10), (10,)), ((64, 768), (768,)),
                                          ((3, 4, 5000), (5000,)), ((4, 6, 7), (6, 7)),
                                          ((2, 3, 4100), (3, 4100))])
def test_accuracy_against_float64_reference(rng, ref_layer_norm, dtype, offset, shape, nshape):
    x = hostile(rng, shape, dtype, offset=offset, scale=rng.choice([1e-2, 1.0, 50.0]))
    y = cynorm.layer_norm(x, nshape)
    assert y.dtype == dtype and y.shape == x.shape
    assert max_err(y, ref_layer_norm(x, nshape)) <= TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["both", "weight", "bias", "none"])
def test_affine_and_eps(rng, ref_layer_norm, dtype, affine):
    x = hostile(rng, (7, 3, 33), dtype)
    w = (rng.uniform(0.5, 2.0, (3, 33))).astype(dtype) if affine in ("both", "weight") else None
    b = (rng.uniform(-1, 1, (3, 33))).astype(dtype) if affine in ("both", "bias") else None
    for eps in (1e-5, 0.3):
        y = cynorm.layer_norm(x, (3, 33), w, b, eps=eps)
        assert max_err(y, ref_layer_norm(x, (3, 33), w, b, eps)) <= 4 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(rng, torch, dtype):
    for shape, nshape in [((5, 10), 10), ((2, 9, 64), (9, 64)), ((3, 4, 5, 6), (6,))]:
        x = rng.standard_normal(shape).astype(dtype)
        nsh = (nshape,) if isinstance(nshape, int) else nshape
        w = rng.standard_normal(nsh).astype(dtype)
        b = rng.standard_normal(nsh).astype(dtype)
        expect = torch.nn.functional.layer_norm(torch.from_numpy(x), nsh, torch.from_numpy(w),
                                                torch.from_numpy(b), eps=1e-3).numpy()
        got = cynorm.layer_norm(x, nshape, w, b, eps=1e-3)
        np.testing.assert_allclose(got, expect, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_more_accurate_than_torch_far_from_zero(rng, torch, ref_layer_norm):
    x = (1e6 + rng.standard_normal((64, 768))).astype(np.float32)
    ref = ref_layer_norm(x, 768)
    err_torch = max_err(torch.nn.functional.layer_norm(torch.from_numpy(x), (768,)).numpy(), ref)
    err_cynorm = max_err(cynorm.layer_norm(x, 768), ref)
    assert err_cynorm <= 1e-5 < err_torch


@pytest.mark.parametrize("dtype,result", [(np.float16, np.float16), (np.int32, np.float64),
                                          (np.int64, np.float64), (np.uint8, np.float64),
                                          (np.bool_, np.float64), (">f4", np.float32),
                                          (">f8", np.float64)])
def test_dtype_policy(rng, ref_layer_norm, dtype, result):
    x = (rng.standard_normal((6, 20)) * 4).astype(dtype)
    y = cynorm.layer_norm(x, 20)
    assert y.dtype == np.dtype(result)
    tol = 3e-3 if result == np.float16 else TOL[np.dtype(result)]
    assert max_err(y, ref_layer_norm(x.astype(np.float64), 20)) <= tol


def test_float16_is_computed_in_float32(rng, ref_layer_norm):
    x = (1000 + rng.standard_normal((4, 300))).astype(np.float16)
    y = cynorm.layer_norm(x, 300)
    expected = ref_layer_norm(x.astype(np.float64), 300).astype(np.float16)
    assert y.dtype == np.float16
    assert np.max(np.abs(y.astype(np.float64) - expected)) <= 4e-3


@pytest.mark.parametrize("bad", [np.complex128, object, "U3", "datetime64[s]", np.longdouble])
def test_unsupported_dtypes_raise(bad):
    x = np.ones((2, 3)).astype(bad) if bad is not object else np.array([[1, 2, 3]] * 2, dtype=object)
    if np.dtype(bad) == np.float64:  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    with pytest.raises(TypeError, match="dtype"):
        cynorm.layer_norm(x, 3)


def test_lists_are_accepted(ref_layer_norm):
    x = [[1.0, 2.0, 4.0], [0.0, -1.0, 7.0]]
    assert max_err(cynorm.layer_norm(x, 3), ref_layer_norm(np.array(x), 3)) <= 1e-12


@pytest.mark.parametrize("layout", ["fortran", "slice", "negative", "transposed", "readonly",
                                    "memmap", "unaligned"])
def test_layouts(rng, ref_layer_norm, tmp_path, layout):
    base = hostile(rng, (24, 40), np.float64)
    if layout == "fortran":
        x = np.asfortranarray(base)
    elif layout == "slice":
        x = base[::3, ::2]
    elif layout == "negative":
        x = base[::-1, ::-1]
    elif layout == "transposed":
        x = base.T
    elif layout == "readonly":
        x = base.copy()
        x.flags.writeable = False
    elif layout == "memmap":
        path = tmp_path / "x.npy"
        np.save(path, base)
        x = np.load(path, mmap_mode="r")
    else:
        buf = np.zeros(base.nbytes + 1, np.uint8)
        x = buf[1:].view(np.float64).reshape(base.shape)
        x[...] = base
        assert not x.flags.aligned
    before = np.array(x, copy=True)
    y = cynorm.layer_norm(x, x.shape[-1])
    assert max_err(y, ref_layer_norm(before, x.shape[-1])) <= 1e-12
    np.testing.assert_array_equal(x, before)  # input untouched


def test_out_and_in_place(rng, ref_layer_norm):
    x = hostile(rng, (8, 100), np.float32)
    ref = ref_layer_norm(x, 100)
    out = np.empty_like(x)
    assert cynorm.layer_norm(x, 100, out=out) is out
    assert max_err(out, ref) <= 1e-5
    # a non-contiguous out
    big = np.zeros((8, 200), np.float32)
    r = cynorm.layer_norm(x, 100, out=big[:, ::2])
    assert r.base is big and max_err(big[:, ::2], ref) <= 1e-5 and not big[:, 1::2].any()
    # in place
    y = x.copy()
    assert cynorm.layer_norm(y, 100, out=y) is y
    assert max_err(y, ref) <= 1e-5
    # float16 out
    h = (3 * rng.standard_normal((8, 100))).astype(np.float16)
    out16 = np.empty_like(h)
    cynorm.layer_norm(h, 100, out=out16)
    np.testing.assert_array_equal(out16, cynorm.layer_norm(h, 100))


def test_out_overlapping_input_differently(rng, ref_layer_norm):
    x = hostile(rng, (10, 50), np.float64)
    ref = ref_layer_norm(x, 50)
    y = x.copy()
    # out is the rows of y in reverse order: overlaps but is not the same elements
    out = y[::-1]
    cynorm.layer_norm(y, 50, out=out)
    assert max_err(out, ref) <= 1e-12


def test_out_errors(rng):
    x = rng.standard_normal((4, 5))
    with pytest.raises(ValueError, match="shape"):
        cynorm.layer_norm(x, 5, out=np.empty((5, 4)))
    with pytest.raises(TypeError, match="dtype"):
        cynorm.layer_norm(x, 5, out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="ndarray"):
        cynorm.layer_norm(x, 5, out=[[0] * 5] * 4)
    ro = np.empty((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cynorm.layer_norm(x, 5, out=ro)


def test_shape_errors(rng):
    x = rng.standard_normal((5, 10))
    with pytest.raises(ValueError, match=r"normalized_shape=\[3\]"):
        cynorm.layer_norm(x, 3)
    with pytest.raises(ValueError, match="normalized_shape"):
        cynorm.layer_norm(x, (2, 5, 10))
    with pytest.raises(ValueError, match="weight"):
        cynorm.layer_norm(x, 10, weight=np.ones(3))
    with pytest.raises(ValueError, match="bias"):
        cynorm.layer_norm(x, 10, bias=np.ones((1, 10)))
    with pytest.raises(ValueError, match="at least one"):
        cynorm.layer_norm(x, ())
    with pytest.raises(TypeError, match="normalized_shape"):
        cynorm.layer_norm(x, "10")
    with pytest.raises(TypeError, match="eps"):
        cynorm.layer_norm(x, 10, eps="small")


def test_nan_and_inf_stay_in_their_row(rng):
    x = rng.standard_normal((4, 30))
    x[1, 3] = np.nan
    x[2, 7] = np.inf
    y = cynorm.layer_norm(x, 30)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    assert np.isfinite(y[[0, 3]]).all()


def test_empty_inputs():
    assert cynorm.layer_norm(np.empty((0, 10)), 10).shape == (0, 10)
    assert cynorm.layer_norm(np.empty((3, 0)), 0).shape == (3, 0)
    assert cynorm.layer_norm(np.empty((0, 4), np.float16), 4).dtype == np.float16


def test_constant_rows(torch):
    x = np.full((3, 8), 2.5, np.float32)
    b = np.arange(8, dtype=np.float32)
    np.testing.assert_array_equal(cynorm.layer_norm(x, 8, bias=b), np.broadcast_to(b, x.shape))
    # eps = 0 with variance 0: 0/0, NaN as torch gives
    expect = torch.nn.functional.layer_norm(torch.from_numpy(x), (8,), eps=0.0).numpy()
    got = cynorm.layer_norm(x, 8, eps=0.0)
    assert np.isnan(expect).all() and np.isnan(got).all()


def test_thread_count_invariance(rng):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = hostile(rng, (512, 1000), np.float32)
    default = cynorm.layer_norm(x, 1000)
    with threadpoolctl.threadpool_limits(1, "openmp"):
        assert cynorm.get_num_threads() == 1
        single = cynorm.layer_norm(x, 1000)
    with cynorm.num_threads(2):
        two = cynorm.layer_norm(x, 1000)
    np.testing.assert_array_equal(default, single)  # rows are independent: bitwise equal
    np.testing.assert_array_equal(default, two)
