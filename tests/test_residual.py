"""The residual-add forms, add_layer_norm and add_rms_norm, and grad_residual= in the backwards:
h = x + residual rounded once as torch's add, y the norm of h, in one pass, in place too."""
import numpy as np
import pytest

import cynorm
from conftest import hostile

DTYPES = [np.float32, np.float64]
OPS = {
    "layer_norm": (cynorm.add_layer_norm, cynorm.layer_norm),
    "rms_norm": (cynorm.add_rms_norm, cynorm.rms_norm),
}


def _norm_args(op, rng, nshape, dtype):
    w = rng.uniform(0.5, 2, nshape).astype(dtype)
    if op == "layer_norm":
        return (w, rng.uniform(-1, 1, nshape).astype(dtype))
    return (w,)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nshape", [((5, 10), (10,)), ((64, 768), (768,)),
                                          ((3, 4, 5000), (5000,)), ((4, 6, 7), (6, 7)),
                                          ((13, 512), (512,))])
def test_equals_add_then_norm_bitwise(rng, op, dtype, shape, nshape):
    fused, norm = OPS[op]
    x = hostile(rng, shape, dtype, offset=1e3)
    r = hostile(rng, shape, dtype)
    args = _norm_args(op, rng, nshape, dtype)
    y, h = fused(x, r, nshape, *args)
    np.testing.assert_array_equal(h, x + r)
    np.testing.assert_array_equal(y, norm(x + r, nshape, *args))
    stats = fused(x, r, nshape, *args, return_stats=True)[2:]
    expect = norm(x + r, nshape, *args, return_stats=True)[1:]
    assert len(stats) == len(expect) == (2 if op == "layer_norm" else 1)
    for a, b in zip(stats, expect):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_in_place_residual_stream(rng, op):
    fused, norm = OPS[op]
    for D in (16, 3000):   # the short rows eight at a time, and long ones
        x = hostile(rng, (37, D), np.float32)
        r = hostile(rng, (37, D), np.float32)
        h_expect = x + r
        y_expect = norm(h_expect, D)
        for target in ("x", "residual"):
            xs, rs = x.copy(), r.copy()
            dest = xs if target == "x" else rs
            y, h = fused(xs, rs, D, residual_out=dest)
            assert h is dest
            np.testing.assert_array_equal(h, h_expect)
            np.testing.assert_array_equal(y, y_expect)
        # y over x and h over the residual: both streams in place
        xs, rs = x.copy(), r.copy()
        y, h = fused(xs, rs, D, out=xs, residual_out=rs)
        assert y is xs and h is rs
        np.testing.assert_array_equal(h, h_expect)
        np.testing.assert_array_equal(y, y_expect)


def test_outputs_and_layouts(rng):
    x = hostile(rng, (12, 40), np.float64)
    r = hostile(rng, (12, 40), np.float64)
    y0, h0 = cynorm.add_layer_norm(x, r, 40)
    # strided, Fortran, read-only inputs; strided outputs
    ro = r.copy()
    ro.flags.writeable = False
    for xv, rv in ((np.asfortranarray(x), ro), (np.repeat(x, 2, 1)[:, ::2], r[::-1][::-1])):
        y, h = cynorm.add_layer_norm(xv, rv, 40)
        np.testing.assert_array_equal(y, y0)
        np.testing.assert_array_equal(h, h0)
    out = np.zeros((12, 80))
    hout = np.zeros((12, 80))
    y, h = cynorm.add_layer_norm(x, r, 40, out=out[:, ::2], residual_out=hout[:, 1::2])
    np.testing.assert_array_equal(out[:, ::2], y0)
    np.testing.assert_array_equal(hout[:, 1::2], h0)
    assert not out[:, 1::2].any() and not hout[:, ::2].any()
    # residual_out overlapping x partly: still right (computed aside, then copied)
    buf = np.concatenate([x, r], axis=1).copy()
    xs = buf[:, :40]
    y, h = cynorm.add_layer_norm(xs, r, 40, residual_out=buf[:, 20:60])
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(buf[:, 20:60], h0[:, :])


@pytest.mark.parametrize("op", OPS)
def test_masks_write_h_everywhere(rng, op):
    fused, norm = OPS[op]
    x = hostile(rng, (3, 6, 24), np.float32)
    r = hostile(rng, (3, 6, 24), np.float32)
    lengths = np.array([6, 0, 4])
    mask = np.arange(6) < lengths[:, None]
    y, h = fused(x, r, 24, lengths=lengths)
    np.testing.assert_array_equal(h, x + r)   # the residual stream exists on padding too
    assert (y[~mask] == 0).all()
    np.testing.assert_array_equal(y[mask], norm((x + r)[mask], 24))
    y2, _ = fused(x, r, 24, mask=mask, out=np.full_like(x, 7.0))
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_other_dtypes_add_then_normalize(rng, dtype):
    x = (rng.standard_normal((5, 30)) * 4).astype(dtype)
    r = (rng.standard_normal((5, 30)) * 4).astype(dtype)
    for fused, norm in OPS.values():
        y, h = fused(x, r, 30)
        assert h.dtype == dtype   # torch's add: the input dtype
        np.testing.assert_array_equal(h, x + r)
        np.testing.assert_array_equal(y, norm(x + r, 30))


def test_errors(rng):
    x = rng.standard_normal((4, 6))
    for fused, _ in OPS.values():
        with pytest.raises(ValueError, match="residual must have the shape of x"):
            fused(x, x[:2], 6)
        with pytest.raises(TypeError, match="residual must have the dtype of x"):
            fused(x, x.astype(np.float32), 6)
        with pytest.raises(ValueError, match="out and residual_out must not overlap"):
            out = np.empty_like(x)
            fused(x, x, 6, out=out, residual_out=out)
        with pytest.raises(TypeError, match="out must have dtype"):
            fused(x, x, 6, residual_out=np.empty((4, 6), np.float32))
        with pytest.raises(ValueError, match="normalized_shape"):
            fused(x, x, 5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 10), (9, 700), (5, 3, 64)])
def test_backward_with_grad_residual_matches_torch_autograd(rng, torch, op, dtype, shape):
    # h = x + r feeds both the norm and the next residual: d/dx = d/dr = dnorm(h) + grad_h.
    # torch differentiates the float64 graph from x and r (float64), or from the rounded h
    # (float32, whose h differs from the exact x + r by its rounding)
    D = shape[-1]
    # (moderate offsets: torch's float64 reference itself loses digits far from zero)
    x = hostile(rng, shape, dtype, offset=10.0)
    r = hostile(rng, shape, dtype, offset=0.0)
    gy = rng.standard_normal(shape).astype(dtype)
    gh = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2, D).astype(dtype)
    if op == "layer_norm":
        y, h, mean, rstd = cynorm.add_layer_norm(x, r, D, w, return_stats=True)
        dh, dw, _ = cynorm.layer_norm_backward(gy, h, mean, rstd, D, w, grad_residual=gh)
    else:
        y, h, rstd = cynorm.add_rms_norm(x, r, D, w, return_stats=True)
        dh, dw = cynorm.rms_norm_backward(gy, h, rstd, D, w, grad_residual=gh)
    t64 = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)  # noqa: E731
    wt = t64(w)
    if dtype == np.float64:
        leaves = [t64(x), t64(r)]
        ht = leaves[0] + leaves[1]
    else:
        leaves = [t64(h)]
        ht = leaves[0]
    if op == "layer_norm":
        yt = torch.nn.functional.layer_norm(ht, (D,), wt, None, 1e-5)
    else:
        yt = torch.nn.functional.rms_norm(ht, (D,), wt, float(np.finfo(dtype).eps))
    loss = (yt * torch.from_numpy(gy.astype(np.float64))).sum() \
        + (ht * torch.from_numpy(gh.astype(np.float64))).sum()
    loss.backward()
    tol = 1e-5 if dtype == np.float32 else 1e-11
    for leaf in leaves:
        ref = leaf.grad.numpy()
        np.testing.assert_allclose(dh, ref, rtol=tol, atol=tol * np.abs(ref).max())
    ref = wt.grad.numpy()
    np.testing.assert_allclose(dw, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_grad_residual_is_added_once_and_padding_gets_it(rng):
    x = hostile(rng, (41, 300), np.float32)   # four-row sweeps and a remainder
    g = rng.standard_normal(x.shape).astype(np.float32)
    gr = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, rstd = cynorm.layer_norm(x, 300, return_stats=True)
    dx = cynorm.layer_norm_backward(g, x, mean, rstd, 300)[0]
    dxr = cynorm.layer_norm_backward(g, x, mean, rstd, 300, grad_residual=gr)[0]
    np.testing.assert_array_equal(dxr, dx + gr)
    mask = rng.random(41) < 0.7
    _, mean, rstd = cynorm.layer_norm(x, 300, return_stats=True, mask=mask)
    dxm = cynorm.layer_norm_backward(g, x, mean, rstd, 300, mask=mask, grad_residual=gr)[0]
    np.testing.assert_array_equal(dxm[~mask], gr[~mask])
    np.testing.assert_array_equal(
        dxm[mask], cynorm.layer_norm_backward(g, x, mean, rstd, 300, mask=mask)[0][mask]
        + gr[mask])
