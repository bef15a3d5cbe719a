"""Property-based tests: any shape, dtype, layout and eps gives the float64 reference's answer
or a clear exception, never a crash.  CYNORM_HYPOTHESIS_PROFILE=long runs many more examples."""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import cynorm  # noqa: E402
from conftest import reference_norm, reference_rms  # noqa: E402

settings.register_profile("quick", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CYNORM_HYPOTHESIS_PROFILE", "quick"))

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.bool_]


@st.composite
def arrays(draw, min_dims=1, max_dims=5):
    """Arrays of any small shape (0- and 1-sized dims included), dtype and layout: C order,
    Fortran order, strided and reversed views, unaligned buffers."""
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=6))
    dtype = draw(st.sampled_from(DTYPES))
    offset = draw(st.sampled_from([0.0, 3.0, -1e3, 1e4]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        base = rng.random(shape) < 0.5
    elif np.dtype(dtype).kind == "i":
        base = rng.integers(-50, 50, shape).astype(dtype)
    else:
        scale = 1.0 if dtype == np.float16 else draw(st.sampled_from([1e-3, 1.0, 50.0]))
        base = (offset * (dtype != np.float16) + scale * rng.standard_normal(shape)).astype(dtype)
    layout = draw(st.sampled_from(["c", "f", "strided", "reversed", "unaligned"]))
    if layout == "f":
        return np.asfortranarray(base)
    if layout == "strided" and base.ndim:
        big = np.zeros(tuple(2 * s for s in shape), dtype=base.dtype)
        view = big[tuple(slice(None, None, 2) for _ in shape)]
        view[...] = base
        return view
    if layout == "reversed" and base.ndim:
        return base[::-1].copy()[::-1]
    if layout == "unaligned" and base.dtype.itemsize > 1 and base.size:
        buf = np.zeros(base.nbytes + 1, np.uint8)
        view = buf[1:].view(base.dtype).reshape(base.shape)
        view[...] = base
        return view
    return base


def _tol(x):
    kind = np.asarray(x).dtype
    if kind == np.float16:
        return 5e-3
    if kind == np.float32:
        return 1e-4
    return 1e-9


@given(x=arrays(), k=st.integers(1, 3), eps=st.sampled_from([1e-5, 1e-2, 1.0]),
       affine=st.booleans())
def test_layer_norm_property(x, k, eps, affine):
    k = min(k, x.ndim)
    nshape = x.shape[x.ndim - k:]
    w = np.linspace(0.5, 2, int(np.prod(nshape))).reshape(nshape) if affine else None
    b = np.linspace(-1, 1, int(np.prod(nshape))).reshape(nshape) if affine else None
    y = cynorm.layer_norm(x, nshape, w, b, eps)
    assert y.shape == x.shape
    assert y.dtype == (x.dtype if x.dtype.kind == "f" else np.float64)
    if x.size:
        ref = reference_norm(x.astype(np.float64), tuple(range(x.ndim - k, x.ndim)), w, b, eps,
                             nshape)
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.max(np.abs(y.astype(np.float64) - ref)) <= _tol(x) * scale


@given(x=arrays(min_dims=2), axis=st.integers(-5, 4), training=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-1]))
def test_batch_norm_property(x, axis, training, eps):
    if not -x.ndim <= axis < x.ndim:
        with pytest.raises(np.exceptions.AxisError):
            cynorm.batch_norm(x, training=True, axis=axis)
        return
    C = x.shape[axis]
    n = int(np.prod([s for i, s in enumerate(x.shape) if i != axis % x.ndim]))  # per feature
    rm, rv = np.zeros(C), np.ones(C)
    if training and n == 1:
        with pytest.raises(ValueError):
            cynorm.batch_norm(x, rm, rv, training=True, eps=eps, axis=axis)
        assert (rm == 0).all() and (rv == 1).all()
        return
    y = cynorm.batch_norm(x, rm, rv, training=training, eps=eps, axis=axis)
    assert y.shape == x.shape
    if n == 0:  # an empty batch (torch 2.13): nothing to learn from
        assert (rm == 0).all() and (rv == 1).all()
    assert y.dtype == (x.dtype if x.dtype.kind == "f" else np.float64)
    if x.size:
        ax = axis % x.ndim
        axes = tuple(i for i in range(x.ndim) if i != ax)
        shape = [1] * x.ndim
        shape[ax] = C
        x64 = x.astype(np.float64)
        if training:
            ref = reference_norm(x64, axes, eps=eps)
        else:
            ref = x64 / np.sqrt(1.0 + eps)
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.max(np.abs(y.astype(np.float64) - ref)) <= _tol(x) * scale


@given(x=arrays(min_dims=3, max_dims=3), data=st.data())
def test_masks_property(x, data):
    N, T, C = x.shape
    lengths = np.array(data.draw(st.lists(st.integers(0, T), min_size=N, max_size=N)),
                       dtype=np.int64)
    mask = np.arange(T) < lengths[:, None]
    y = cynorm.layer_norm(x, C, lengths=lengths)
    assert y.shape == x.shape and not y[~mask].any()
    if mask.any() and C:
        np.testing.assert_allclose(y[mask], cynorm.layer_norm(x[mask], C), rtol=0, atol=0)
    n_real = int(mask.sum())
    if C == 0:
        return
    if N * T == 0:  # an empty batch, as torch: an empty output
        assert cynorm.batch_norm(x, training=True, axis=-1, mask=mask).shape == x.shape
        return
    if n_real < 2:
        with pytest.raises(ValueError, match="more than 1 value|empty batch"):
            cynorm.batch_norm(x, training=True, axis=-1, mask=mask)
        return
    z = cynorm.batch_norm(x, training=True, axis=-1, mask=mask)
    assert not z[~mask].any()
    ref = cynorm.batch_norm(np.ascontiguousarray(x[mask]), training=True)
    np.testing.assert_allclose(z[mask].astype(np.float64), ref.astype(np.float64),
                               atol=_tol(x) * max(1.0, float(np.abs(ref).max())))


@given(x=arrays(min_dims=1), data=st.data())
def test_moments_property(x, data):
    axes = tuple(sorted(data.draw(st.sets(st.integers(0, x.ndim - 1)))))
    use_mask = data.draw(st.booleans())
    rshape = tuple(x.shape[i] for i in axes)
    mask = None
    if use_mask:
        seed = data.draw(st.integers(0, 2**16))
        mask = np.random.default_rng(seed).random(rshape) < 0.6
    m = cynorm.moments(x, axes, mask=mask)
    keep = [i for i in range(x.ndim) if i not in axes]
    assert m.shape == tuple(x.shape[i] for i in keep)
    x64 = np.moveaxis(x.astype(np.float64), keep, list(range(x.ndim - len(keep), x.ndim)))
    flat = x64.reshape((int(np.prod(rshape)),) + m.shape)
    if mask is not None:
        flat = flat[mask.reshape(-1)]
    np.testing.assert_array_equal(m.count, flat.shape[0])
    if flat.shape[0] and flat.size:
        scale = max(1.0, float(np.abs(flat).max()))
        assert np.max(np.abs(m.mean - flat.mean(axis=0))) <= 1e-12 * scale
        assert np.max(np.abs(m.var() - flat.var(axis=0))) <= 1e-12 * scale * scale
    # split along the first reduced axis anywhere: the merge is the whole
    if axes and mask is None:
        cut = data.draw(st.integers(0, x.shape[axes[0]]))
        a, b = np.split(x, [cut], axis=axes[0])
        merged = cynorm.moments(a, axes) + cynorm.moments(b, axes)
        np.testing.assert_array_equal(merged.count, m.count)
        if m.count.size and m.count.flat[0]:
            scale = max(1.0, float(np.abs(x.astype(np.float64)).max()))
            assert np.max(np.abs(merged.mean - m.mean)) <= 1e-12 * scale
            assert np.max(np.abs(merged.var() - m.var())) <= 1e-12 * scale * scale


@given(x=arrays(min_dims=2, max_dims=3), bad=st.sampled_from(
    ["shape", "weight", "out_shape", "out_dtype", "mask_dtype"]))
def test_bad_arguments_raise_clear_errors(x, bad):
    nshape = x.shape[-1:]
    kwargs = {}
    if bad == "shape":
        nshape = (x.shape[-1] + 1,)
    elif bad == "weight":
        kwargs["weight"] = np.ones(x.shape[-1] + 2)
    elif bad == "out_shape":
        kwargs["out"] = np.empty(x.shape + (1,))
    elif bad == "out_dtype":
        kwargs["out"] = np.empty(x.shape, dtype=np.complex64)
    else:
        kwargs["mask"] = np.ones(x.shape[:-1], dtype=np.int8)
    with pytest.raises((ValueError, TypeError)):
        cynorm.layer_norm(x, nshape, **kwargs)


def _ln_backward_reference(g, x, nshape, w):
    """float64 LayerNorm backward from the formula, rows of the trailing dims."""
    k = len(nshape)
    D = int(np.prod(nshape))
    x2 = x.reshape(-1, D).astype(np.float64)
    g2 = g.reshape(-1, D).astype(np.float64)
    w1 = np.ones(D) if w is None else np.asarray(w, np.float64).reshape(D)
    mean = x2.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x2 - mean) ** 2).mean(axis=1, keepdims=True) + 1e-5)
    xh = (x2 - mean) * rstd
    gw = g2 * w1
    dx = rstd * (gw - gw.mean(1, keepdims=True) - xh * (gw * xh).mean(1, keepdims=True))
    return dx.reshape(x.shape), (g2 * xh).sum(0).reshape(nshape) if k else None


@given(x=arrays(min_dims=1, max_dims=4), k=st.integers(1, 2), affine=st.booleans(),
       seed=st.integers(0, 2**16))
def test_layer_norm_backward_property(x, k, affine, seed):
    if x.dtype.kind != "f" or x.dtype == np.float16:
        x = x.astype(np.float64)
    k = min(k, x.ndim)
    nshape = x.shape[x.ndim - k:]
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    w = np.linspace(0.5, 2, int(np.prod(nshape))).reshape(nshape).astype(x.dtype) \
        if affine else None
    _, mean, rstd = cynorm.layer_norm(x, nshape, w, None, return_stats=True)
    dx, dw, db = cynorm.layer_norm_backward(g, x, mean, rstd, nshape, w, w)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert (dw is None) == (w is None)
    if x.size:
        ref_dx, ref_dw = _ln_backward_reference(g, x, nshape, w)
        scale = max(1.0, float(np.abs(ref_dx).max()))
        tol = 2e-3 if x.dtype == np.float32 else 1e-6
        assert np.max(np.abs(dx - ref_dx)) <= tol * scale
        if w is not None:
            assert np.max(np.abs(dw - ref_dw)) <= tol * max(1.0, float(np.abs(ref_dw).max()))
            np.testing.assert_allclose(db, g.reshape(-1, w.size).sum(0).reshape(nshape),
                                       rtol=tol, atol=tol * max(1.0, float(np.abs(g).sum())))


@given(x=arrays(min_dims=2, max_dims=4), training=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_norm_backward_property(x, training, seed):
    if x.dtype.kind != "f" or x.dtype == np.float16:
        x = x.astype(np.float64)
    C = x.shape[1]
    n = x.size // C if C else 0
    if C == 0 or n < 2:
        return
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    w = np.linspace(0.5, 2, C).astype(x.dtype)
    rm, rv = np.zeros(C), np.full(C, 2.0)
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, w, w, training, return_stats=True)
    dx, dw, db = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, bias=w)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = C
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    m, inv = mean.reshape(shape), invstd.reshape(shape)
    xh = (x64 - m) * inv
    sg, sgx = g64.sum(axes), (g64 * xh).sum(axes)
    wr = w.astype(np.float64).reshape(shape)
    if training:
        ref = wr * inv * (g64 - sg.reshape(shape) / n - xh * sgx.reshape(shape) / n)
    else:
        ref = g64 * wr * inv
    tol = 2e-3 if x.dtype == np.float32 else 1e-6
    assert np.max(np.abs(dx - ref)) <= tol * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(db, sg, rtol=tol, atol=tol * max(1.0, float(np.abs(g64).sum())))
    np.testing.assert_allclose(dw, sgx, rtol=tol, atol=tol * max(1.0, float(np.abs(sgx).max())))


@given(x=arrays(), k=st.integers(1, 3), eps=st.sampled_from([None, 1e-5, 1.0]),
       affine=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_property(x, k, eps, affine, seed):
    k = min(k, x.ndim)
    nshape = x.shape[x.ndim - k:]
    w = np.linspace(0.5, 2, int(np.prod(nshape))).reshape(nshape) if affine else None
    y, rstd = cynorm.rms_norm(x, nshape, w, eps, return_stats=True)
    assert y.shape == x.shape
    assert y.dtype == (x.dtype if x.dtype.kind == "f" else np.float64)
    cdt = np.float64 if x.dtype.kind != "f" or x.dtype == np.float64 else np.float32
    ref_eps = float(np.finfo(cdt).eps) if eps is None else eps
    if x.size:
        ref, ref_rstd = reference_rms(x.astype(np.float64), nshape, w, ref_eps)
        ok = np.isfinite(ref)   # all-zero rows with eps: 0, fine; reference NaN only for 0/0
        assert np.max(np.abs(y[ok].astype(np.float64) - ref[ok])) <= _tol(x) * max(
            1.0, float(np.abs(ref[ok]).max(initial=0)))
        # the backward of the same call, with grad_residual, against the formula
        g = np.random.default_rng(seed).standard_normal(x.shape)
        gr = np.random.default_rng(seed + 1).standard_normal(x.shape)
        x64 = x.astype(np.float64)
        dx, dw = cynorm.rms_norm_backward(g, x64, ref_rstd, nshape, w, grad_residual=gr)
        D = int(np.prod(nshape))
        r = ref_rstd.reshape(-1, 1)
        xh = x64.reshape(-1, D) * r
        gw = g.reshape(-1, D) * (1.0 if w is None else w.reshape(D))
        want = r * gw - xh * (r * (gw * xh).mean(1, keepdims=True)) + gr.reshape(-1, D)
        ok = np.isfinite(want)
        assert np.max(np.abs(dx.reshape(-1, D)[ok] - want[ok])) <= 1e-9 * max(
            1.0, float(np.abs(want[ok]).max(initial=0)))
        assert (dw is None) == (w is None)


@given(x=arrays(min_dims=1, max_dims=4), k=st.integers(1, 2), centred=st.booleans(),
       seed=st.integers(0, 2**16))
def test_residual_forms_property(x, k, centred, seed):
    # h is x + residual in x's dtype, exactly; y is the norm of h, exactly
    k = min(k, x.ndim)
    nshape = x.shape[x.ndim - k:]
    r = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    fused, norm = ((cynorm.add_layer_norm, cynorm.layer_norm) if centred
                   else (cynorm.add_rms_norm, cynorm.rms_norm))
    y, h = fused(x, r, nshape)
    np.testing.assert_array_equal(h, x + r)
    assert h.dtype == (x + r).dtype
    np.testing.assert_array_equal(y, norm(x + r, nshape))


@given(x=arrays(min_dims=2, max_dims=5), data=st.data(), eps=st.sampled_from([1e-5, 1e-2, 1.0]),
       affine=st.booleans(), last=st.booleans(), seed=st.integers(0, 2**16))
def test_group_and_instance_norm_property(x, data, eps, affine, last, seed):
    from conftest import reference_group_backward, reference_group_norm
    axis = -1 if last else 1
    C = x.shape[axis]
    G = data.draw(st.sampled_from([d for d in range(1, C + 1) if C % d == 0] or [1]))
    w = np.linspace(0.5, 2, C) if affine else None
    b = np.linspace(-1, 1, C) if affine else None
    y, mean, rstd = cynorm.group_norm(x, G, w, b, eps, axis=axis, return_stats=True)
    assert y.shape == x.shape and mean.shape == (x.shape[0], G)
    assert y.dtype == (x.dtype if x.dtype.kind == "f" else np.float64)
    if x.size:
        ref = reference_group_norm(x.astype(np.float64), G, w, b, eps, axis=axis)[0]
        assert np.max(np.abs(y.astype(np.float64) - ref)) <= _tol(x) * max(
            1.0, float(np.abs(ref).max()))
        g = np.random.default_rng(seed).standard_normal(x.shape)
        x64 = x.astype(np.float64)
        _, m64, r64 = cynorm.group_norm(x64, G, w, b, eps, axis=axis, return_stats=True)
        dx, dw, db = cynorm.group_norm_backward(g, x64, m64, r64, G, w, bias=b, axis=axis)
        rdx, rdw, rdb = reference_group_backward(g, x64, G, w, eps, axis=axis,
                                                 stats=(m64, r64))
        assert np.max(np.abs(dx - rdx)) <= 1e-8 * max(1.0, float(np.abs(rdx).max()))
        assert (dw is None) == (w is None) and (db is None) == (b is None)
    spatial = int(np.prod(x.shape[1:])) // max(C, 1) if C else 0
    if spatial <= 1:
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            cynorm.instance_norm(x, weight=w, bias=b, eps=eps, axis=axis)
    else:
        yi = cynorm.instance_norm(x, weight=w, bias=b, eps=eps, axis=axis)
        if x.size:
            ref = reference_group_norm(x.astype(np.float64), C, w, b, eps, axis=axis)[0]
            assert np.max(np.abs(yi.astype(np.float64) - ref)) <= _tol(x) * max(
                1.0, float(np.abs(ref).max()))
