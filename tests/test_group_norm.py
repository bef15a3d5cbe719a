"""GroupNorm: group_norm, group_norm_backward and the GroupNorm layer, channels-first and
channels-last, against the float64 reference and torch (F.group_norm, autograd, nn.GroupNorm)."""
import numpy as np
import pytest

import cynorm
from conftest import (TOL, hostile, max_err, numeric_grad, reference_group_backward,
                      reference_group_norm)

DTYPES = [np.float32, np.float64]
# (shape channels-first, num_groups)
CASES = [((4, 6, 5), 3), ((3, 8, 7, 5), 2), ((2, 6), 3), ((2, 4, 9), 4), ((2, 64, 33), 32),
         ((2, 12, 3, 2, 5), 1), ((1, 10, 3000), 5), ((5, 3, 1), 3)]


def channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def params(rng, C, dtype):
    return rng.uniform(-2, 2, C).astype(dtype), rng.uniform(-3, 3, C).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("shape,G", CASES)
def test_accuracy_against_float64_reference(rng, dtype, offset, shape, G):
    x = hostile(rng, shape, dtype, offset=offset)
    w, b = params(rng, shape[1], dtype)
    for weight, bias in ((None, None), (w, b), (w, None)):
        ref, ref_mean, ref_rstd = reference_group_norm(x, G, weight, bias)
        y, mean, rstd = cynorm.group_norm(x, G, weight, bias, return_stats=True)
        assert y.dtype == dtype and y.shape == x.shape
        assert max_err(y, ref) <= TOL[np.dtype(dtype)]
        assert mean.shape == rstd.shape == (shape[0], G) and mean.dtype == np.float64
        atol = 1e-15 * np.abs(x).max()
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-15, atol=atol)
        np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-6 if dtype == np.float32 else 1e-12)
        if len(shape) > 2:  # the same data channels-last
            xl = channels_last(x)
            yl, mean_l, _ = cynorm.group_norm(xl, G, weight, bias, axis=-1, return_stats=True)
            assert max_err(yl, channels_last(ref)) <= TOL[np.dtype(dtype)]
            np.testing.assert_allclose(mean_l, ref_mean, rtol=1e-15, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(rng, torch, dtype):
    F = torch.nn.functional
    for shape, G in CASES:
        x = (rng.standard_normal(shape) * 3 + rng.uniform(-5, 5)).astype(dtype)
        w, b = params(rng, shape[1], dtype)
        xt, wt, bt = (torch.from_numpy(a) for a in (x, w, b))
        expect = F.group_norm(xt.double(), G, wt.double(), bt.double(), 1e-3).numpy()
        got = cynorm.group_norm(x, G, w, b, 1e-3)
        assert max_err(got, expect) <= 10 * TOL[np.dtype(dtype)]
        own = F.group_norm(xt, G, wt, bt, 1e-3).numpy()
        assert max_err(got, own) <= (1e-4 if dtype == np.float32 else 1e-12)  # torch rounds
        _, mean_t, rstd_t = torch.native_group_norm(xt.double(), wt.double(), bt.double(),
                                                    shape[0], shape[1],
                                                    int(np.prod(shape[2:])), G, 1e-3)
        _, mean, rstd = cynorm.group_norm(x.astype(np.float64), G, eps=1e-3, return_stats=True)
        np.testing.assert_allclose(mean, mean_t.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rstd, rstd_t.numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("shape,G", CASES)
def test_backward_against_reference(rng, dtype, offset, shape, G):
    x = hostile(rng, shape, dtype, offset=offset)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, shape[1], dtype)
    tol = 2e-4 if dtype == np.float32 else 1e-11
    for weight in (None, w):
        for axis, xa, ga in ((1, x, g), (-1, channels_last(x), channels_last(g))):
            if len(shape) == 2 and axis == -1:
                continue
            _, mean, rstd = cynorm.group_norm(xa, G, weight, b, axis=axis, return_stats=True)
            # the statistics are checked against the exact ones by the forward's test; the
            # backward is checked at the float64 statistics it is given (see the reference)
            rdx, ref_dw, ref_db = reference_group_backward(ga, xa, G, weight, axis=axis,
                                                           stats=(mean, rstd))
            dx, dw, db = cynorm.group_norm_backward(ga, xa, mean, rstd, G, weight, bias=b,
                                                    axis=axis)
            assert dx.dtype == dtype and dx.shape == xa.shape
            scale = max(1.0, np.abs(rdx).max())
            assert max_err(dx, rdx) <= tol * scale
            assert db.dtype == dtype
            np.testing.assert_allclose(db, ref_db, rtol=tol, atol=tol * np.abs(g).sum() / 100)
            if weight is None:
                assert dw is None
            else:
                np.testing.assert_allclose(dw, ref_dw, rtol=tol,
                                           atol=tol * np.abs(g).sum() / 10)


def test_backward_finite_differences(rng):
    for shape, G, axis in (((2, 4, 3), 2, 1), ((2, 3, 4), 1, -1), ((3, 6), 3, 1)):
        x = rng.standard_normal(shape)
        g = rng.standard_normal(shape)
        C = shape[axis]
        w, b = rng.standard_normal(C), rng.standard_normal(C)

        def loss():
            return float(np.sum(g * cynorm.group_norm(x, G, w, b, axis=axis)))

        _, mean, rstd = cynorm.group_norm(x, G, w, b, axis=axis, return_stats=True)
        dx, dw, db = cynorm.group_norm_backward(g, x, mean, rstd, G, w, bias=b, axis=axis)
        np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_torch(rng, torch, dtype):
    shape, G = (3, 8, 5, 4), 4
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, 8, dtype)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    torch.nn.functional.group_norm(xt, G, wt, bt).backward(torch.from_numpy(g))
    _, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)
    dx, dw, db = cynorm.group_norm_backward(g, x, mean, rstd, G, w, bias=b)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=tol, atol=tol)


def cut_reference(x, lengths, G, w, b, axis):
    """Each sample cut to its length, normalized alone; padding 0 (NaN stats when empty)."""
    y = np.zeros(x.shape)
    means = np.full((x.shape[0], G), np.nan)
    for n, L in enumerate(lengths):
        if L == 0:
            continue
        xs = x[n:n + 1, :, :L] if axis == 1 else x[n:n + 1, :L]
        ys, means[n], _ = reference_group_norm(xs, G, w, b, axis=axis)
        if axis == 1:
            y[n, :, :L] = ys[0]
        else:
            y[n, :L] = ys[0]
    return y, means


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_masks_match_cut_sequences(rng, dtype, axis):
    N, C, L, G = 5, 6, 37, 3
    lengths = np.array([37, 10, 0, 1, 23])
    shape = (N, C, L) if axis == 1 else (N, L, C)
    x = hostile(rng, shape, dtype, offset=1e4)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, C, dtype)
    ref, ref_mean = cut_reference(x, lengths, G, w, b, axis)
    mask = np.arange(L) < lengths[:, None]
    for kw in ({"lengths": lengths}, {"mask": mask}):
        y, mean, rstd = cynorm.group_norm(x, G, w, b, axis=axis, return_stats=True, **kw)
        assert max_err(y, ref) <= TOL[np.dtype(dtype)]
        np.testing.assert_array_equal(np.isnan(mean[:, 0]), lengths == 0)
        np.testing.assert_allclose(mean[lengths > 0], ref_mean[lengths > 0], rtol=1e-15,
                                   atol=1e-15 * np.abs(x).max())
        dx, dw, db = cynorm.group_norm_backward(g, x, mean, rstd, G, w, bias=b, axis=axis, **kw)
        ref_dx = np.zeros(shape)
        ref_dw = np.zeros(C)
        ref_db = np.zeros(C)
        for n, Ln in enumerate(lengths):
            if Ln == 0:
                continue
            cut = (slice(n, n + 1), slice(None), slice(0, Ln)) if axis == 1 else \
                (slice(n, n + 1), slice(0, Ln))
            rdx, rdw, rdb = reference_group_backward(g[cut], x[cut], G, w, axis=axis,
                                                     stats=(mean[n:n + 1], rstd[n:n + 1]))
            ref_dx[cut] = rdx
            ref_dw += rdw
            ref_db += rdb
        tol = 2e-4 if dtype == np.float32 else 1e-9
        assert max_err(dx, ref_dx) <= tol * max(1.0, np.abs(ref_dx).max())
        np.testing.assert_allclose(dw, ref_dw, rtol=tol, atol=tol * 10)
        np.testing.assert_allclose(db, ref_db, rtol=tol, atol=tol * 10)


def test_mask_that_is_not_a_prefix(rng):
    x = rng.standard_normal((2, 4, 20))
    mask = rng.random((2, 20)) < 0.6
    y = cynorm.group_norm(x, 2, mask=mask)
    for n in range(2):
        xs = x[n][:, mask[n]][None]
        np.testing.assert_allclose(y[n][:, mask[n]], reference_group_norm(xs, 2)[0][0],
                                   atol=1e-12)
        assert (y[n][:, ~mask[n]] == 0).all()
    yl = cynorm.group_norm(channels_last(x), 2, axis=-1, mask=mask)
    np.testing.assert_allclose(yl, channels_last(y), atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_thread_count_does_not_change_results(rng, dtype, axis):
    x = hostile(rng, (6, 16, 40, 9), dtype, offset=1e3)
    if axis == -1:
        x = channels_last(x)
    g = rng.standard_normal(x.shape).astype(dtype)
    w, b = params(rng, 16, dtype)
    runs = []
    for n in (1, 2, 3):
        with cynorm.num_threads(n):
            y, mean, rstd = cynorm.group_norm(x, 4, w, b, axis=axis, return_stats=True)
            grads = cynorm.group_norm_backward(g, x, mean, rstd, 4, w, bias=b, axis=axis)
        runs.append((y, mean, rstd) + grads)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            np.testing.assert_array_equal(a, c)


def test_out_in_place_and_layouts(rng):
    x = rng.standard_normal((3, 6, 50)) * 4 + 2
    expect = cynorm.group_norm(x, 3)
    out = np.empty_like(x)
    assert cynorm.group_norm(x, 3, out=out) is out
    np.testing.assert_array_equal(out, expect)
    x2 = x.copy()
    assert cynorm.group_norm(x2, 3, out=x2) is x2
    np.testing.assert_array_equal(x2, expect)
    strided = np.empty((3, 6, 100))[:, :, ::2]
    cynorm.group_norm(x, 3, out=strided)
    np.testing.assert_array_equal(strided, expect)
    # a non-contiguous input, float16 and integer input
    xt = np.asfortranarray(x)
    np.testing.assert_array_equal(cynorm.group_norm(xt, 3), expect)
    y16 = cynorm.group_norm(x.astype(np.float16), 3)
    assert y16.dtype == np.float16
    yi = cynorm.group_norm(np.arange(36).reshape(2, 6, 3), 2)
    assert yi.dtype == np.float64
    with pytest.raises(TypeError, match="out must have dtype"):
        cynorm.group_norm(x, 3, out=np.empty(x.shape, np.float32))
    with pytest.raises(ValueError, match="out must have shape"):
        cynorm.group_norm(x, 3, out=np.empty((3, 6, 49)))


def test_empty_inputs():
    y, mean, rstd = cynorm.group_norm(np.zeros((0, 6, 4)), 3, return_stats=True)
    assert y.shape == (0, 6, 4) and mean.shape == (0, 3)
    dx, dw, db = cynorm.group_norm_backward(np.zeros((0, 6, 4)), np.zeros((0, 6, 4)), mean,
                                            rstd, 3, np.ones(6), bias=np.zeros(6))
    assert dx.shape == (0, 6, 4)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_errors_match_torch(torch):
    x = np.zeros((2, 6, 5))
    with pytest.raises(RuntimeError, match="divisible by num_groups, but got input of shape "
                                           r"\[2, 6, 5\] and num_groups=4"):
        cynorm.group_norm(x, 4)
    with pytest.raises(RuntimeError, match="Expected at least 2 dimensions"):
        cynorm.group_norm(np.zeros(6), 3)
    with pytest.raises(RuntimeError, match="Expected weight to be a vector of size equal to "
                                           "the number of channels"):
        cynorm.group_norm(x, 3, np.ones(5))
    with pytest.raises(RuntimeError, match="divisible"):
        cynorm.group_norm(x, 0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        cynorm.group_norm(x, 1.5)
    with pytest.raises(ValueError, match="axis must name the channel axis"):
        cynorm.group_norm(np.zeros((2, 6, 5, 4)), 3, axis=2)
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups "
                                         r"\(4\)"):
        cynorm.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="mask= and lengths= take input of shape"):
        cynorm.group_norm(np.zeros((2, 6, 5, 4)), 3, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths must lie in"):
        cynorm.group_norm(x, 3, lengths=[1, 6])
    with pytest.raises(ValueError, match="mask must have the input's batch shape"):
        cynorm.group_norm(x, 3, mask=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="unsupported dtype"):
        cynorm.group_norm(x.astype(complex), 3)
    with pytest.raises(ValueError, match="mean must have 6 elements"):
        cynorm.group_norm_backward(x, x, np.zeros(5), np.zeros(6), 3)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        cynorm.group_norm_backward(x[:1], x, np.zeros(6), np.zeros(6), 3)
    # torch raises the same kinds
    with pytest.raises(RuntimeError):
        torch.nn.functional.group_norm(torch.zeros(2, 6, 5), 4)
    with pytest.raises(ValueError):
        torch.nn.GroupNorm(4, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_matches_torch_module(rng, torch, dtype):
    for axis in (1, -1):
        layer = cynorm.GroupNorm(4, 8, axis=axis, dtype=dtype)
        module = torch.nn.GroupNorm(4, 8).to(torch.float64)
        w, b = params(rng, 8, np.float64)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w))
            module.bias.copy_(torch.from_numpy(b))
        layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})
        assert sorted(layer.state_dict()) == sorted(module.state_dict()) == ["bias", "weight"]
        x = (rng.standard_normal((3, 8, 6, 5)) * 2 - 1).astype(dtype)
        g = rng.standard_normal(x.shape).astype(dtype)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        yt = module(xt)
        yt.backward(torch.from_numpy(g.astype(np.float64)))
        xa, ga = (x, g) if axis == 1 else (channels_last(x), channels_last(g))
        for mode in ("train", "eval"):
            getattr(layer, mode)()
            y = layer(xa)
            dx = layer.backward(ga)
            if axis == -1:
                y, dx = np.moveaxis(y, -1, 1), np.moveaxis(dx, -1, 1)
            tol = 1e-4 if dtype == np.float32 else 1e-10
            np.testing.assert_allclose(y, yt.detach().numpy(), atol=tol)
            np.testing.assert_allclose(dx, xt.grad.numpy(), atol=tol)
            np.testing.assert_allclose(layer.grad_weight, module.weight.grad.numpy(), atol=tol * 10)
            np.testing.assert_allclose(layer.grad_bias, module.bias.grad.numpy(), atol=tol * 10)
    plain = cynorm.GroupNorm(2, 4, affine=False)
    assert plain.weight is None and plain.state_dict() == {}
    nob = cynorm.GroupNorm(2, 4, bias=False)
    assert list(nob.state_dict()) == ["weight"]
    nob(np.ones((2, 4, 3), np.float32))
    nob.backward(np.ones((2, 4, 3), np.float32))
    assert nob.grad_bias is None and nob.grad_weight.shape == (4,)
    assert repr(plain) == "GroupNorm(2, 4, eps=1e-05, affine=False)"
    with pytest.raises(RuntimeError, match="needs a forward pass first"):
        cynorm.GroupNorm(2, 4).backward(np.ones((2, 4, 3)))


@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e-30), (np.float32, 1e30),
                                         (np.float32, 1e37), (np.float64, 1e-300),
                                         (np.float64, 1e200), (np.float64, 1e300)])
@pytest.mark.parametrize("axis", [1, -1])
def test_tiny_and_huge_data(rng, dtype, scale, axis):
    """Squares that overflow or underflow, eps 0 too: the result of the data scaled to ~1."""
    x = (rng.standard_normal((3, 4, 40)) * scale + 2 * scale).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    if axis == -1:
        x, g = channels_last(x), channels_last(g)
    xs = x.astype(np.float64) / scale
    for eps in (1e-5, 0.0):
        eps_s = eps / scale / scale
        if not np.isfinite(eps_s):
            continue
        ref, ref_mean, ref_rstd = reference_group_norm(xs, 2, eps=eps_s, axis=axis)
        y, mean, rstd = cynorm.group_norm(x, 2, eps=eps, axis=axis, return_stats=True)
        assert max_err(y, ref) <= 10 * TOL[np.dtype(dtype)]
        np.testing.assert_allclose(mean / scale, ref_mean, rtol=1e-6)
        np.testing.assert_allclose(rstd * scale, ref_rstd, rtol=1e-6)
        dx, dw, db = cynorm.group_norm_backward(g, x, mean, rstd, 2, np.ones(4, dtype),
                                                bias=np.ones(4, dtype), axis=axis)
        rdx, rdw, rdb = reference_group_backward(g, xs, 2, np.ones(4), eps=eps_s, axis=axis)
        assert max_err(dx * scale, rdx) <= 1e-5 * np.abs(rdx).max()
        np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4)
        yi = cynorm.instance_norm(x, eps=eps, axis=axis)
        ri = reference_group_norm(xs, 4, eps=eps_s, axis=axis)[0]
        assert max_err(yi, ri) <= 10 * TOL[np.dtype(dtype)]


def test_nan_and_inf_stay_in_their_group(rng):
    x = rng.standard_normal((2, 4, 10))
    x[0, 0, 3] = np.nan
    x[1, 3, 0] = np.inf
    for axis, xa in ((1, x), (-1, channels_last(x))):
        y = cynorm.group_norm(xa, 2, axis=axis)
        yc = y if axis == 1 else np.moveaxis(y, -1, 1)
        assert np.isnan(yc[0, :2]).all() and np.isnan(yc[1, 2:]).all()
        assert np.isfinite(yc[0, 2:]).all() and np.isfinite(yc[1, :2]).all()


@pytest.mark.parametrize("phase", [0, 16, 40])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_outputs_at_any_alignment(rng, phase, axis, dtype):
    """Outputs past the streaming threshold (28 MB of float32), written at any place in a
    cache line: the same values as the reference; masked rows too (channels-last vector
    path with 64 channels)."""
    from conftest import at_phase
    shape = (4, 64, 27000) if axis == 1 else (4, 27000, 64)
    x = hostile(rng, shape, dtype, offset=1e3)
    out = at_phase(x, phase)
    lengths = np.array([27000, 13001, 0, 5])
    for kw in ({}, {"lengths": lengths}):
        y = cynorm.group_norm(x, 32, axis=axis, out=out, **kw)
        assert y is out
        for n in (0, 1, 3):
            L = lengths[n] if kw else 27000
            xs = x[n:n + 1, :, :L] if axis == 1 else x[n:n + 1, :L]
            ys = y[n:n + 1, :, :L] if axis == 1 else y[n:n + 1, :L]
            assert max_err(ys, reference_group_norm(xs, 32, axis=axis)[0]) <= TOL[np.dtype(dtype)]
        if kw:
            assert (y[2] == 0).all()
            pad = y[1, :, 13001:] if axis == 1 else y[1, 13001:]
            assert (pad == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_masked_vector_path(rng, dtype):
    """Channels-last with 64 channels (whole vector blocks) and 70 (a tail), masked."""
    for C in (64, 70):
        x = hostile(rng, (3, 300, C), dtype, offset=1e2)
        mask = rng.random((3, 300)) < 0.7
        y = cynorm.group_norm(x, 2, axis=-1, mask=mask)
        for n in range(3):
            ref = reference_group_norm(x[n][mask[n]][None], 2, axis=-1)[0][0]
            assert max_err(y[n][mask[n]], ref) <= TOL[np.dtype(dtype)]
            assert (y[n][~mask[n]] == 0).all()


@pytest.mark.parametrize("name", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(rng, name):
    from cynorm import _isa
    module = _isa.load(name)
    if module is None:
        pytest.skip(f"{name} kernels not built or not runnable on this CPU")
    for dtype in DTYPES:
        for N, C, S, G, last in ((3, 64, 70, 32, True), (2, 12, 301, 4, False),
                                 (4, 70, 9, 7, True), (2, 8, 33, 8, False)):
            x = hostile(rng, (N, S, C) if last else (N, C, S), dtype, offset=1e2)
            g = rng.standard_normal(x.shape).astype(dtype)
            w = rng.uniform(0.5, 2, C).astype(dtype)
            mask = (np.arange(S) < rng.integers(0, S + 1, N)[:, None]).reshape(-1)
            outs = []
            for mod in (cynorm._isa.kernels, module):
                for m in (None, mask):
                    y, st = np.empty_like(x), np.empty((6, N * G))
                    mod.group_norm(x, y, N, C, S, G, last, w, w, 1e-5, st, False, m, True, 1)
                    count = np.where(np.isnan(st[4]), 0.0, st[0])
                    dx, sums = np.empty_like(x), np.empty((N, 2, C))
                    dw, db = np.empty_like(w), np.empty_like(w)
                    mod.group_norm_backward(g, x, dx, N, C, S, G, last,
                                            np.stack([count, st[4], st[5]]), w, False, sums,
                                            dw, db, m, 1)
                    outs.append((y, st[4:], dx, dw, db))
            tol = 1e-5 if dtype == np.float32 else 1e-12
            for a, b in zip(outs[:2], outs[2:]):
                for u, v in zip(a, b):
                    np.testing.assert_allclose(u, v, rtol=tol,
                                               atol=tol * float(np.nanmax(np.abs(v))))
