"""Shared fixtures: fresh random data, the float64 references, torch (optional or required)."""
import functools
import os
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest

# scikit-learn's estimator checks run check_array_api_input (NumPy namespace) only with this set,
# and skip it otherwise; SciPy reads it when first imported, so it is set before any test module.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

# Max abs error of the normalized output against the float64 reference, per compute dtype.
TOL = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture
def rng(request):
    """A generator with fresh entropy; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("CYNORM_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"seed for {request.node.name}: CYNORM_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def torch():
    """torch, or a skip; with CYNORM_REQUIRE_TORCH=1 a missing torch is a failure."""
    if os.environ.get("CYNORM_REQUIRE_TORCH", "0") not in ("", "0"):
        import torch as _torch  # noqa: PLC0415 - a hard failure is the point
        return _torch
    return pytest.importorskip("torch")


def optional(module):
    """An optional dependency (scikit-learn, dask, distributed), or a skip; with
    CYNORM_REQUIRE_EXTRAS=1 (as in .ci/run) a missing one is a failure."""
    if os.environ.get("CYNORM_REQUIRE_EXTRAS", "0") not in ("", "0"):
        import importlib  # noqa: PLC0415

        return importlib.import_module(module)
    return pytest.importorskip(module)


def reference_moments(x, axes, mask=None):
    """(count, mean, biased var) over ``axes`` in float64, the mean carried beyond float64
    resolution; with a mask over the reduced axes, of the positions it marks True."""
    x = np.asarray(x, np.float64)
    axes = tuple(sorted(a % x.ndim for a in axes))
    keep = [i for i in range(x.ndim) if i not in axes]
    xt = np.transpose(x, list(axes) + keep)
    flat = xt.reshape((-1,) + xt.shape[len(axes):])
    if mask is not None:
        flat = flat[np.asarray(mask).reshape(-1)]
    m0 = flat.mean(axis=0)
    d = flat - m0
    r = d.mean(axis=0)
    d = d - r
    return flat.shape[0], m0 + r, np.mean(d * d, axis=0)


def _centered(x, axes):
    """x - mean(x) over axes, the mean carried to beyond float64 resolution.

    A plain float64 mean of data 1e6 from zero is itself off by ~1e-10; the remainder of a
    first mean is computed from the exact differences and subtracted as well.  Reductions run
    over a contiguous copy with the reduced axes last, so NumPy's pairwise summation applies.
    """
    x = np.asarray(x, dtype=np.float64)
    keep = [i for i in range(x.ndim) if i not in axes]
    xt = np.ascontiguousarray(np.transpose(x, keep + list(axes)))
    flat = xt.reshape(xt.shape[: len(keep)] + (-1,))
    m0 = flat.mean(axis=-1, keepdims=True)
    d = flat - m0
    d = d - d.mean(axis=-1, keepdims=True)
    d = d.reshape(xt.shape)
    inverse = np.argsort(keep + list(axes))
    return np.transpose(d, inverse)


def reference_norm(x, axes, weight=None, bias=None, eps=1e-5, param_shape=None):
    """(x - mean) / sqrt(var + eps) * weight + bias over ``axes``, in float64."""
    axes = tuple(sorted(a % np.ndim(x) for a in axes))
    d = _centered(x, axes)
    var = np.mean(d * d, axis=axes, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = d / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(param_shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(param_shape)
    return y


@pytest.fixture(scope="session")
def ref_layer_norm():
    def ref(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        nshape = (normalized_shape,) if np.isscalar(normalized_shape) else tuple(normalized_shape)
        axes = tuple(range(np.ndim(x) - len(nshape), np.ndim(x)))
        return reference_norm(x, axes, weight, bias, eps, nshape)

    return ref


def reference_rms(x, normalized_shape, weight=None, eps=None):
    """RMSNorm in float64: (y, rstd per row).  Rows of huge values (or eps 0) are scaled by
    their largest magnitude first, so that the squares cannot overflow or underflow."""
    nshape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    x = np.asarray(x)
    if eps is None:
        eps = float(np.finfo(np.float64 if x.dtype == np.float64 else np.float32).eps)
    x64 = x.astype(np.float64).reshape(-1, int(np.prod(nshape)))
    with np.errstate(all="ignore"):
        s = np.max(np.abs(x64), axis=1, keepdims=True)
        s = np.where((s > 1e100) | ((eps == 0) & (s > 0)), s, 1.0)
        xs = x64 / s
        ms = np.mean(xs * xs, axis=1, keepdims=True) + (eps / s / s if eps else 0.0)
        y = xs / np.sqrt(ms)
        rstd = 1 / (s * np.sqrt(ms))
    y = y.reshape(x.shape)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    return y, rstd.reshape(-1)


@pytest.fixture(scope="session")
def ref_rms_norm():
    def ref(x, normalized_shape, weight=None, eps=None):
        return reference_rms(x, normalized_shape, weight, eps)[0]
    return ref


def batch_statistics(x, axis=1):
    """Per-feature mean and biased variance in float64 (feature on ``axis``)."""
    axis = axis % np.ndim(x)
    axes = tuple(i for i in range(np.ndim(x)) if i != axis)
    x64 = np.asarray(x, np.float64)
    d = _centered(x64, axes)
    mean = np.mean(x64 - d, axis=axes)
    return mean, np.mean(d * d, axis=axes)


@pytest.fixture(scope="session")
def ref_batch_norm():
    """Training-mode BN (batch statistics) when mean/var are None, else normalization by them."""

    def ref(x, axis=1, weight=None, bias=None, eps=1e-5, mean=None, var=None):
        axis = axis % np.ndim(x)
        shape = [1] * np.ndim(x)
        shape[axis] = np.shape(x)[axis]
        if mean is None:
            axes = tuple(i for i in range(np.ndim(x)) if i != axis)
            return reference_norm(x, axes, weight, bias, eps, shape)
        x64 = np.asarray(x, np.float64)
        y = (x64 - np.reshape(mean, shape)) / np.sqrt(np.reshape(var, shape).astype(np.float64) + eps)
        if weight is not None:
            y = y * np.reshape(weight, shape)
        if bias is not None:
            y = y + np.reshape(bias, shape)
        return y

    return ref


def reference_norm_backward(g, x, axes, weight, param_shape, eps=1e-5):
    """(dx, dweight, dbias) of reference_norm over ``axes`` (the batch's own statistics), in
    float64: dx = invstd·(g' - mean(g') - x̂·mean(g'·x̂)) with g' = g·weight, and the parameter
    gradients Σ g·x̂ and Σ g over the axes the parameters (of ``param_shape``) broadcast along."""
    axes = tuple(sorted(a % np.ndim(x) for a in axes))
    g = np.asarray(g, np.float64)
    d = _centered(x, axes)
    invstd = 1.0 / np.sqrt(np.mean(d * d, axis=axes, keepdims=True) + eps)
    xhat = d * invstd
    w = 1.0 if weight is None else np.asarray(weight, np.float64).reshape(param_shape)
    gw = g * w
    dx = invstd * (gw - gw.mean(axis=axes, keepdims=True)
                   - xhat * np.mean(gw * xhat, axis=axes, keepdims=True))
    pshape = (1,) * (np.ndim(x) - len(param_shape)) + tuple(param_shape)
    along = tuple(i for i in range(np.ndim(x)) if pshape[i] == 1)
    return dx, (g * xhat).sum(axis=along), g.sum(axis=along)


def reference_eval_backward(g, x, mean, invstd, weight, axis):
    """(dx, dweight, dbias) of BatchNorm in eval mode, the statistics constants, in float64:
    dx = g·weight·invstd, dweight = invstd·Σ g·(x - mean), dbias = Σ g per feature."""
    axis = axis % np.ndim(x)
    per_feature = [1] * np.ndim(x)
    per_feature[axis] = np.shape(x)[axis]
    other = tuple(i for i in range(np.ndim(x)) if i != axis)
    g64 = np.asarray(g, np.float64)
    d64 = np.asarray(x, np.float64) - np.reshape(mean, per_feature)
    return (g64 * np.reshape(weight * invstd, per_feature), (g64 * d64).sum(other) * invstd,
            g64.sum(other))


def hostile(rng, shape, dtype=np.float64, offset=None, scale=None):
    """Random data with an offset and a scale that hurt naive formulas."""
    if offset is None:
        offset = rng.choice([0.0, -3e2, 1e4, 1e6])
    if scale is None:
        scale = rng.choice([1e-3, 1.0, 7.0])
    x = offset * scale + scale * rng.standard_normal(shape)
    return x.astype(dtype)


def bfloat16_or_skip():
    """ml_dtypes' bfloat16, or a skip naming the reason (the test extra installs ml_dtypes)."""
    ml_dtypes = optional("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


def half_dtype(name):
    """float16, or bfloat16 (a skip without ml_dtypes)."""
    return np.dtype(np.float16) if name == "float16" else bfloat16_or_skip()


# ---- 16-bit floats: data, parameters, the one-ulp check, torch's autograd (the test_half_*
# files)

HALVES = ["float16", "bfloat16"]


def half_data(rng, shape, dt, offset_sigmas=1e3, scale=3.0):
    """16-bit data whose mean lies offset_sigmas standard deviations from zero."""
    x = scale * offset_sigmas + scale * rng.standard_normal(shape)
    return x.astype(np.float32).astype(dt)


def half_params(rng, n, params, dt):
    """weight and bias of n features: None ("none"), float32 or the input's dtype ("input")."""
    if params == "none":
        return None, None
    pdt = np.float32 if params == "float32" else dt
    return rng.uniform(0.5, 2.0, n).astype(pdt), rng.standard_normal(n).astype(pdt)


def check_half(y, ref, dt, slack=None):
    """y has the 16-bit dtype dt and lies within one unit in the last place of ref (float64)
    correctly rounded to it.

    slack (float64, ref's shape or broadcast to it): for outputs whose terms cancel so far that
    float64 itself cannot fix their 16-bit value.  The float64 reference and a float64 kernel
    each carry rounding errors of a few 2^-53 of the terms; where the result is below about
    2^-44 of them, that is a 16-bit ulp or more.  There y lies within one ulp of the correctly
    rounded value of some number within slack of ref; elsewhere slack, far below half an ulp,
    changes nothing unless ref lies that close to a rounding boundary."""
    assert y.dtype == dt
    if slack is None:
        u = ulps16(y, correctly_rounded(ref, dt))
        assert u.max() <= 1, f"{int(u.max())} ulps at {np.unravel_index(u.argmax(), u.shape)}"
        return
    assert not np.isnan(ref).any()
    yo = _ordered16(y)
    below = _ordered16(correctly_rounded(ref - slack, dt)) - 1 - yo
    above = yo - _ordered16(correctly_rounded(ref + slack, dt)) - 1
    out = np.maximum(below, above)
    assert out.max() <= 0, (f"{int(out.max())} ulps beyond the bound at "
                            f"{np.unravel_index(out.argmax(), out.shape)}")


@functools.lru_cache(maxsize=64)
def _exact_stats(data, eps):
    """The exact mean (a fraction) and 1 / sqrt(var + eps) (60 digits) of the float64 row
    whose bytes are data."""
    xs = [Fraction(v) for v in np.frombuffer(data, np.float64).tolist()]
    mean = sum(xs) / len(xs)
    var = sum((v - mean) ** 2 for v in xs) / len(xs) + Fraction(eps)
    with localcontext() as ctx:
        ctx.prec = 60
        return mean, 1 / (Decimal(var.numerator) / Decimal(var.denominator)).sqrt()


def exact_norm(row, w, b, js, eps=1e-5):
    """The normalized row (x - mean) / sqrt(var + eps) * w + b at the elements js (w, b: per
    element of the row), in exact rational arithmetic (the square root to 60 digits), rounded
    once to float64."""
    row = np.ascontiguousarray(row, np.float64)
    mean, rstd = _exact_stats(row.tobytes(), eps)
    with localcontext() as ctx:
        ctx.prec = 60
        d = [Fraction(float(row[j])) - mean for j in js]
        return np.array([float(Decimal(e.numerator) / Decimal(e.denominator) * rstd
                               * Decimal(float(w[j])) + Decimal(float(b[j])))
                         for e, j in zip(d, js)])


def mean_beside_150(rng, shape, first=100):
    """Rows (the last axis, D long) of integers 150 ± 30 whose first element is first and whose
    mean is 150 + 1/D: elements equal to 150 lie 1/D from the mean, which lies 150 - first
    from the first element (the shift of the kernels' sums: 100 is under two standard
    deviations away; 20 over four, where the sums are taken again about the mean).  float64,
    exact in float16 and bfloat16."""
    D = shape[-1]
    x = np.clip(np.round(150 + 30 * rng.standard_normal(shape)), 60, 240)
    x[..., 0] = first
    for row in x.reshape(-1, D):   # the sum to 150 D + 1 by unit steps after the first
        steps = int(150 * D + 1 - row.sum())
        every, some = divmod(abs(steps), D - 1)
        row[1:] += every * np.sign(steps)
        row[1 + rng.choice(D - 1, some, replace=False)] += np.sign(steps)
    assert (x.sum(-1) == 150 * D + 1).all()
    return x


def deep_cancelling_params(rng, units, at):
    """Per channel c, whose normalized elements are the float64 row units[c] and whose output
    is checked at units[c][at[c]]: the weight, of 4096 drawn, whose product float32 holds
    best, the bias minus that product to float32 (so that the output is cancelled to some
    2^-37 of its terms; float64 resolves 2^-44), and the exact output there (exact_norm).
    Returns (w, b, want)."""
    def exact(c, weight, bias):
        n = units[c].size
        return exact_norm(units[c], np.full(n, weight), np.full(n, bias), [at[c]])[0]

    C = len(units)
    k = np.array([exact(c, 1.0, 0.0) for c in range(C)])
    cand = rng.uniform(0.5, 2.0, 4096).astype(np.float32)
    p = k[:, None] * cand.astype(np.float64)
    w = cand[np.argmin(np.abs(p - p.astype(np.float32)) / np.abs(p), axis=1)]
    b = np.array([-exact(c, w[c], 0.0) for c in range(C)], np.float32)
    want = np.array([exact(c, w[c], b[c]) for c in range(C)])
    assert np.median(np.abs(want)) < 2.0 ** -30 * np.median(np.abs(b))
    return w, b, want


def same_gradients_as_torch(torch, ours, theirs, w_atol):
    """Backward of (y, x, w) tensors, cynorm's and torch's, from the same random grad_out: the
    gradients in the tensors' dtype and within a few of its ulps of torch's (weight's absolute
    tolerance w_atol of them: a sum over many elements)."""
    (y, x, w), (yt, xt, wt) = ours, theirs
    tdt = x.dtype
    g = torch.randn(y.shape).to(tdt)
    y.backward(g)
    yt.backward(g)
    assert x.grad.dtype == tdt and w.grad.dtype == tdt
    tol = 8 * torch.finfo(tdt).eps
    torch.testing.assert_close(x.grad.float(), xt.grad.float(), rtol=tol, atol=tol * 4)
    torch.testing.assert_close(w.grad.float(), wt.grad.float(), rtol=tol, atol=tol * w_atol)


def correctly_rounded(ref, dtype):
    """The float64 values ref rounded once, to nearest even, to the 16-bit dtype (bfloat16
    by its 8-bit significand in float64 arithmetic: a cast through float32 would round twice;
    float16 by NumPy's cast, which rounds from float64 directly)."""
    ref = np.asarray(ref, np.float64)
    if dtype == np.float16:
        with np.errstate(over="ignore"):   # beyond 65504 the correct result is inf
            return ref.astype(np.float16)
    with np.errstate(all="ignore"):
        m, e = np.frexp(ref)
        r = np.ldexp(np.round(m * 256.0) / 256.0, e)  # exact steps; np.round: half to even
    r = np.where(np.isfinite(ref), r, ref)
    return r.astype(np.float32).astype(dtype)  # exact: r has 8 significant bits


def _ordered16(v):
    """16-bit floats' bits as integers in the order of their values (+0 and -0 both 0)."""
    i = np.asarray(v).view(np.uint16).astype(np.int64)
    return np.where(i & 0x8000, -(i & 0x7FFF), i)


def ulps16(a, b):
    """Per element, how many 16-bit floats apart a and b are (same 16-bit dtype; +0 and -0
    are the same; NaN vs NaN is 0, NaN vs a number a large count)."""
    d = np.abs(_ordered16(a) - _ordered16(b))
    na = np.isnan(np.asarray(a, np.float32))
    nb = np.isnan(np.asarray(b, np.float32))
    return np.where(na & nb, 0, np.where(na | nb, 1 << 20, d))


def at_phase(like, phase):
    """An uninitialized array of like's shape and dtype whose data starts `phase` bytes into a
    64-byte cache line."""
    buf = np.empty(like.nbytes + 64, np.uint8)
    start = (phase - buf.ctypes.data) % 64
    return buf[start:start + like.nbytes].view(like.dtype).reshape(like.shape)


def max_err(y, ref):
    return float(np.max(np.abs(np.asarray(y, np.float64) - ref))) if np.size(ref) else 0.0


def rel_err(a, b):
    """Norm-wise relative error of a against the reference b."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def numeric_grad(f, arr, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of arr (float64)."""
    grad = np.zeros_like(arr, dtype=np.float64)
    flat, gflat = arr.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def _channels_first(x, axis):
    """(x with channels on axis 1, whether x was channels-last)."""
    x = np.asarray(x, np.float64)
    last = x.ndim > 2 and axis % x.ndim == x.ndim - 1
    return (np.moveaxis(x, -1, 1) if last else x), last


def reference_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1):
    """GroupNorm (InstanceNorm: num_groups = C) in float64, the mean carried beyond float64:
    (y, mean, rstd), the statistics of shape (N, num_groups)."""
    xc, last = _channels_first(x, axis)
    N, C = xc.shape[:2]
    xg = xc.reshape(N, num_groups, -1)
    d = _centered(xg, (2,))
    with np.errstate(divide="ignore", invalid="ignore"):
        rstd = 1.0 / np.sqrt(np.mean(d * d, axis=2, keepdims=True) + eps)
    y = (d * rstd).reshape(xc.shape)
    pshape = (1, C) + (1,) * (xc.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(pshape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(pshape)
    mean = np.mean(xg - d, axis=2)
    return (np.moveaxis(y, 1, -1) if last else y), mean, rstd[..., 0]


def reference_group_backward(g, x, num_groups, weight=None, eps=1e-5, axis=1, stats=None):
    """(dx, dweight, dbias) of reference_group_norm, in float64.

    stats=(mean, rstd), float64 of shape (N, num_groups), gives the backward at those
    statistics: x is centred on the mean as given (in extended precision), not on its exact
    mean.  A group mean rounded to float64 moves x - mean by up to half an ulp of the mean, so
    a group whose spread is far below its mean (two close elements 1e4 from zero) has a
    gradient that no backward taking a float64 mean can give more exactly than this."""
    xc, last = _channels_first(x, axis)
    gc, _ = _channels_first(g, axis)
    N, C = xc.shape[:2]
    pshape = (1, C) + (1,) * (xc.ndim - 2)
    if stats is None:
        d = _centered(xc.reshape(N, num_groups, -1), (2,))
        rstd = 1.0 / np.sqrt(np.mean(d * d, axis=2, keepdims=True) + eps)
    else:
        mean, rstd = (np.asarray(s, np.float64).reshape(N, num_groups, 1) for s in stats)
        d = (xc.reshape(N, num_groups, -1).astype(np.longdouble) - mean).astype(np.float64)
    xhat = d * rstd
    w = 1.0 if weight is None else np.asarray(weight, np.float64).reshape(pshape)
    gw = (gc * w).reshape(N, num_groups, -1)
    dx = rstd * (gw - gw.mean(axis=2, keepdims=True)
                 - xhat * np.mean(gw * xhat, axis=2, keepdims=True))
    dx = dx.reshape(xc.shape)
    other = (0,) + tuple(range(2, xc.ndim))
    dw = (gc * xhat.reshape(xc.shape)).sum(axis=other)
    return (np.moveaxis(dx, 1, -1) if last else dx), dw, gc.sum(axis=other)
