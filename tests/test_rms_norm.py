"""RMSNorm: rms_norm, rms_norm_backward and the RMSNorm layer, against the float64 reference and
torch (F.rms_norm, autograd, torch.nn.RMSNorm)."""
import numpy as np
import pytest

import cynorm
from cynorm import _isa
from conftest import hostile, numeric_grad, optional, reference_rms

DTYPES = [np.float32, np.float64]
# elementwise relative error bound of the output against the float64 reference (issue #25)
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}


def assert_close_rel(y, ref, dtype):
    """|y - ref| <= rtol·|ref| elementwise (plus a floor far below any float32 value here)."""
    y = np.asarray(y, np.float64)
    bound = RTOL[np.dtype(dtype)] * np.abs(ref) + 1e-300
    bad = ~(np.abs(y - ref) <= bound)
    assert not bad.any(), (f"{bad.sum()} of {y.size} off; worst relative error "
                           f"{np.max(np.abs(y - ref)[bad] / np.abs(ref)[bad])}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape,nshape", [((5, 10), (10,)), ((64, 768), (768,)),
                                          ((3, 4, 5000), (5000,)), ((4, 6, 7), (6, 7)),
                                          ((2, 3, 4100), (3, 4100)), ((9, 1), (1,))])
def test_accuracy_against_float64_reference(rng, dtype, offset, shape, nshape):
    x = hostile(rng, shape, dtype, offset=offset, scale=rng.choice([1e-2, 1.0, 50.0]))
    w = rng.uniform(-2, 2, nshape).astype(dtype)
    for weight in (None, w):
        for eps in (None, 1e-5):
            y, rstd = cynorm.rms_norm(x, nshape, weight, eps, return_stats=True)
            assert y.dtype == dtype and y.shape == x.shape
            ref, ref_rstd = reference_rms(x, nshape, weight, eps)
            assert_close_rel(y, ref, dtype)
            assert rstd.dtype == np.float64
            assert rstd.shape == shape[: len(shape) - len(nshape)] + (1,) * len(nshape)
            np.testing.assert_allclose(rstd.reshape(-1), ref_rstd, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(rng, torch, dtype):
    F = torch.nn.functional
    for shape, nshape in [((5, 10), 10), ((2, 9, 64), (9, 64)), ((3, 4, 5, 600), (600,))]:
        x = (rng.standard_normal(shape) * 3 + rng.uniform(-5, 5)).astype(dtype)
        nsh = (nshape,) if isinstance(nshape, int) else nshape
        w = rng.standard_normal(nsh).astype(dtype)
        for weight in (None, w):
            for eps in (None, 1e-3):
                wt = None if weight is None else torch.from_numpy(weight)
                expect64 = F.rms_norm(torch.from_numpy(x).double(), nsh,
                                      None if wt is None else wt.double(),
                                      eps if eps is not None else float(np.finfo(dtype).eps))
                got = cynorm.rms_norm(x, nshape, weight, eps)
                assert_close_rel(got, expect64.numpy(), dtype)
                # and torch in the input dtype, within its own rounding
                own = F.rms_norm(torch.from_numpy(x), nsh, wt, eps).numpy()
                np.testing.assert_allclose(got, own, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                           atol=1e-6 if dtype == np.float32 else 1e-13)


def test_eps_none_is_the_compute_dtypes_epsilon(rng):
    # a row of tiny values: eps dominates, so the eps used shows in the result
    x = np.full((1, 4), 1e-6)
    for dtype, eps in ((np.float32, np.finfo(np.float32).eps), (np.float64, np.finfo(np.float64).eps),
                       (np.float16, np.finfo(np.float32).eps)):
        xd = x.astype(dtype)
        np.testing.assert_allclose(cynorm.rms_norm(xd, 4).astype(np.float64),
                                   reference_rms(xd.astype(np.float64), 4, None, float(eps))[0],
                                   rtol=1e-3 if dtype == np.float16 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", [((6, 10), 10), ((4, 3, 700), 700), ((2, 5, 6, 7), (6, 7)),
                                      ((33, 16), 16), ((9, 2049), 2049)])
def test_backward_matches_torch_autograd(rng, torch, dtype, shape, ns):
    nsh = (ns,) if isinstance(ns, int) else ns
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, nsh).astype(dtype)
    for weight in (w, None):
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        wt = None if weight is None else torch.tensor(weight.astype(np.float64),
                                                       requires_grad=True)
        eps = float(np.finfo(dtype).eps)
        torch.nn.functional.rms_norm(xt, nsh, wt, eps).backward(torch.from_numpy(
            g.astype(np.float64)))
        _, rstd = cynorm.rms_norm(x, ns, weight, return_stats=True)
        dx, dw = cynorm.rms_norm_backward(g, x, rstd, ns, weight)
        assert dx.dtype == dtype and dx.shape == x.shape
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
        if weight is None:
            assert dw is None
        else:
            assert dw.dtype == dtype and dw.shape == nsh
            np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=tol, atol=tol * shape[0])


def test_finite_differences(rng):
    x = rng.standard_normal((3, 7)) + 0.5
    w = rng.uniform(0.5, 2, 7)
    g = rng.standard_normal((3, 7))
    gr = rng.standard_normal((3, 7))
    eps = 1e-3
    loss = lambda: float(np.sum(g * cynorm.rms_norm(x, 7, w, eps)))  # noqa: E731
    _, rstd = cynorm.rms_norm(x, 7, w, eps, return_stats=True)
    dx, dw = cynorm.rms_norm_backward(g, x, rstd, 7, w)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-8)
    # the residual form: the loss of y = rms_norm(x + r) and of h = x + r itself
    r = rng.standard_normal((3, 7))
    loss2 = lambda: float(np.sum(g * cynorm.add_rms_norm(x, r, 7, w, eps)[0])  # noqa: E731
                          + np.sum(gr * (x + r)))
    y, h, rstd = cynorm.add_rms_norm(x, r, 7, w, eps, return_stats=True)
    dh, dw = cynorm.rms_norm_backward(g, h, rstd, 7, w, grad_residual=gr)
    np.testing.assert_allclose(dh, numeric_grad(loss2, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dh, numeric_grad(loss2, r), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(rng, dtype):
    base = (rng.standard_normal((12, 40)) * 3 + 2).astype(dtype)
    expect = cynorm.rms_norm(base, 40)
    views = {"fortran": np.asfortranarray(base), "strided": np.repeat(base, 2, axis=1)[:, ::2],
             "reversed rows": base[::-1][::-1], "negative strides": base[:, ::-1]}
    for name, v in views.items():
        ref = expect if name != "negative strides" else cynorm.rms_norm(base[:, ::-1].copy(), 40)
        np.testing.assert_array_equal(cynorm.rms_norm(v, 40), ref, err_msg=name)
    ro = base.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(cynorm.rms_norm(ro, 40), expect)
    # out=, a strided out, and in place
    out = np.empty_like(base)
    assert cynorm.rms_norm(base, 40, out=out) is out
    np.testing.assert_array_equal(out, expect)
    big = np.zeros((12, 80), dtype)
    cynorm.rms_norm(base, 40, out=big[:, ::2])
    np.testing.assert_array_equal(big[:, ::2], expect)
    assert not big[:, 1::2].any()
    x = base.copy()
    cynorm.rms_norm(x, 40, out=x)
    np.testing.assert_array_equal(x, expect)
    # the backward takes any layout too
    g = rng.standard_normal((12, 40)).astype(dtype)
    _, rstd = cynorm.rms_norm(base, 40, return_stats=True)
    dx = cynorm.rms_norm_backward(g, base, rstd, 40)[0]
    np.testing.assert_array_equal(
        cynorm.rms_norm_backward(np.asfortranarray(g), np.asfortranarray(base), rstd, 40)[0], dx)


@pytest.mark.parametrize("dtype,result", [(np.float16, np.float16), (np.int32, np.float64),
                                          (np.bool_, np.float64), (">f4", np.float32)])
def test_dtype_policy(rng, dtype, result):
    x = (rng.standard_normal((6, 20)) * 4).astype(dtype)
    y = cynorm.rms_norm(x, 20)
    assert y.dtype == result
    ref = reference_rms(x.astype(np.float64), 20, None,
                        float(np.finfo(np.float64 if result == np.float64 else np.float32).eps))[0]
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-3 if result == np.float16
                               else 1e-6, atol=1e-3 if result == np.float16 else 1e-12)


def test_thread_invariance(rng):
    x = hostile(rng, (301, 3000), np.float32, offset=1e3)
    g = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.uniform(0.5, 2, 3000).astype(np.float32)
    results = []
    for n in (1, 2, 3):
        with cynorm.num_threads(n):
            y, rstd = cynorm.rms_norm(x, 3000, w, return_stats=True)
            results.append((y, rstd) + cynorm.rms_norm_backward(g, x, rstd, 3000, w)[:1])
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(rng, name):
    module = _isa.load(name)
    if module is None:
        pytest.skip(f"{name} kernels not built or not runnable on this CPU")
    for dtype in DTYPES:
        for M, D in ((37, 1000), (9, 203), (64, 128)):
            x = hostile(rng, (M, D), dtype, offset=1e2)
            g = rng.standard_normal((M, D)).astype(dtype)
            w = rng.uniform(0.5, 2, D).astype(dtype)
            outs = []
            for mod in (_isa.kernels, module):
                y, rstd = np.empty_like(x), np.empty(M)
                mod.rms_norm(x, y, D, w, rstd, 1e-6, 1)
                dx, dw = np.empty_like(x), np.empty_like(w)
                mod.rms_norm_backward(g, x, dx, D, w, rstd, dw, 1)
                outs.append((y, rstd, dx, dw))
            # relative to each output's largest magnitude: dx = rstd·g' - c·x cancels, and
            # the builds round it differently (as LayerNorm's ISA test allows)
            tol = 1e-5 if dtype == np.float32 else 1e-12
            for a, b in zip(*outs):
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e-30), (np.float32, 1e30),
                                         (np.float32, 1e38), (np.float64, 1e300),
                                         (np.float64, 1e-300), (np.float64, 1e-310),
                                         (np.float64, 1e200)])
def test_tiny_and_huge_rows_stay_finite(rng, dtype, scale):
    x = (rng.standard_normal((5, 300)).clip(-3, 3) * scale).astype(dtype)   # finite in float32
    for eps in (None, 0.0):
        y, rstd = cynorm.rms_norm(x, 300, eps=eps, return_stats=True)
        ref, ref_rstd = reference_rms(x, 300, None, eps)
        assert np.isfinite(y).all()
        finite = np.isfinite(ref_rstd)
        np.testing.assert_allclose(rstd.reshape(-1)[finite], ref_rstd[finite], rtol=1e-6)
        assert_close_rel(y, ref, np.float32 if scale == 1e-310 else dtype)


def test_nan_inf_and_zero_rows(torch):
    x = np.ones((4, 8))
    x[0, 3] = np.nan
    x[1, 2] = np.inf
    x[2] = 0.0
    y = cynorm.rms_norm(x, 8, eps=0.0)
    expect = torch.nn.functional.rms_norm(torch.from_numpy(x), (8,), eps=0.0).numpy()
    # torch's results: NaN poisons its row, an inf row is 0 but at the inf, 0 / 0 is NaN
    np.testing.assert_array_equal(y, expect)
    assert np.isnan(y[0]).all() and np.isnan(y[1, 2]) and (np.delete(y[1], 2) == 0).all()
    assert np.isnan(y[2]).all() and (y[3] == 1).all()
    y = cynorm.rms_norm(x, 8)   # with eps, a zero row is zero
    assert (y[2] == 0).all() and np.isnan(y[0]).all()
    np.testing.assert_array_equal(y, torch.nn.functional.rms_norm(torch.from_numpy(x), (8,),
                                                                  eps=2.0 ** -52).numpy())


def test_masks_and_lengths(rng):
    x = (rng.standard_normal((3, 5, 16)) + 2).astype(np.float32)
    lengths = np.array([5, 0, 2])
    mask = np.arange(5) < lengths[:, None]
    y, rstd = cynorm.rms_norm(x, 16, return_stats=True, lengths=lengths)
    np.testing.assert_array_equal(y, cynorm.rms_norm(x, 16, mask=mask))
    np.testing.assert_array_equal(y[mask], cynorm.rms_norm(x[mask], 16))
    assert (y[~mask] == 0).all() and np.isnan(rstd[~mask]).all()
    g = rng.standard_normal(x.shape).astype(np.float32)
    gr = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw = cynorm.rms_norm_backward(g, x, rstd, 16, np.ones(16, np.float32), mask=mask)
    dx2, dw2 = cynorm.rms_norm_backward(g[mask], x[mask], rstd[mask], 16,
                                        np.ones(16, np.float32))
    np.testing.assert_allclose(dx[mask], dx2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, dw2, rtol=1e-5, atol=1e-6)
    assert (dx[~mask] == 0).all()
    dxr = cynorm.rms_norm_backward(g, x, rstd, 16, lengths=lengths, grad_residual=gr)[0]
    np.testing.assert_array_equal(dxr[~mask], gr[~mask])   # padding: only the residual's


def test_errors(rng):
    x = rng.standard_normal((4, 6))
    with pytest.raises(ValueError, match="normalized_shape"):
        cynorm.rms_norm(x, 5)
    with pytest.raises(ValueError, match="weight must have shape"):
        cynorm.rms_norm(x, 6, np.ones(5))
    with pytest.raises(TypeError, match="unsupported dtype"):
        cynorm.rms_norm(x.astype(complex), 6)
    with pytest.raises(TypeError, match="eps"):
        cynorm.rms_norm(x, 6, eps="small")
    _, rstd = cynorm.rms_norm(x, 6, return_stats=True)
    with pytest.raises(ValueError, match="rstd must have 4 elements"):
        cynorm.rms_norm_backward(x, x, rstd[:2], 6)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        cynorm.rms_norm_backward(x[:2], x, rstd, 6)
    with pytest.raises(ValueError, match="must have the shape of x"):
        cynorm.rms_norm_backward(x, x, rstd, 6, grad_residual=x[:2])


def test_layer_matches_torch_module(rng, torch):
    x = (rng.standard_normal((3, 5, 32)) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref = torch.nn.RMSNorm(32, eps=None)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 32).astype(np.float32)))
    layer = cynorm.RMSNorm(32)
    assert set(layer.state_dict()) == set(ref.state_dict()) == {"weight"}
    layer.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))
    y = layer(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.grad_weight, ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert layer.alpha is layer.weight and layer.grad_bias is None
    # no affine, explicit eps, float64, eval mode: the same as the function
    plain = cynorm.RMSNorm((5, 32), eps=1e-3, elementwise_affine=False, dtype=np.float64).eval()
    assert plain.weight is None and plain.state_dict() == {}
    np.testing.assert_array_equal(plain(x.astype(np.float64)),
                                  cynorm.rms_norm(x.astype(np.float64), (5, 32), eps=1e-3))
    with pytest.raises(RuntimeError, match="forward pass first"):
        cynorm.RMSNorm(4).backward(np.ones((2, 4)))


def test_onnx_rms_normalization_is_the_same_call(rng):
    # ONNX RMSNormalization-23: axis gives normalized_shape = x.shape[axis:]
    onnx = optional("onnx")
    ort = optional("onnxruntime")
    from onnx import TensorProto, helper

    x = (rng.standard_normal((2, 3, 4, 10)) + 1).astype(np.float32)
    for axis in (-1, 2, 1):
        nshape = x.shape[axis:]
        scale = rng.uniform(0.5, 2, nshape).astype(np.float32)
        node = helper.make_node("RMSNormalization", ["X", "S"], ["Y"], axis=axis, epsilon=1e-5)
        graph = helper.make_graph(
            [node], "rms", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape),
                            helper.make_tensor_value_info("S", TensorProto.FLOAT, nshape)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, x.shape)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        onnx.checker.check_model(model)
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        expect = sess.run(None, {"X": x, "S": scale})[0]
        got = cynorm.rms_norm(x, x.shape[axis:], scale, 1e-5)
        np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-6)
        assert_close_rel(got, reference_rms(x, nshape, scale, 1e-5)[0], np.float32)
