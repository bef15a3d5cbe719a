"""Public functions: ``layer_norm`` and ``batch_norm`` (torch.nn.functional semantics)."""
import math

import numpy as np

from ._isa import kernels as _kernels
from ._threads import get_num_threads, threads_for
from ._validation import (
    as_array,
    as_rows,
    check_out,
    dtypes,
    feature_axis,
    normalized_shape as _normalized_shape,
    param,
    real_scalar,
    same_memory,
    to_compute,
    view_rows,
)

__all__ = ["layer_norm", "batch_norm"]

# BatchNorm on (A, C, L): rows of L >= ROW_PATH_MIN contiguous elements are reduced one by one;
# shorter ones (L == 1 is the (N, C) and (N, T, C) case) are reduced down the columns of (A, C*L).
ROW_PATH_MIN = 64
# Rows per block of the column reduction: about this many bytes stay in L2 between its two passes.
COLUMN_BLOCK_BYTES = 1 << 17
# Rows each thread of the column reduction gets at least.
COLUMN_ROWS_PER_THREAD = 64


def _output(x_shape, rows, cols, cdt, rdt, out, inputs):
    """(2-D array the kernel writes, the array to return or None to cast/copy y2 into it).

    The kernel writes straight into ``out`` when a 2-D view of it exists, has the compute dtype
    and either shares no memory with the inputs or is exactly the input x (in place).
    """
    if out is None:
        if rdt == cdt:
            y = np.empty(x_shape, dtype=cdt)
            return y.reshape(rows, cols), y
        return np.empty((rows, cols), dtype=cdt), None
    check_out(out, x_shape, rdt)
    if rdt == cdt:
        y2 = view_rows(out, rows, cols)
        if y2 is not None:
            shared = [a is not None and np.may_share_memory(out, a) for a in inputs]
            if not any(shared) or (not any(shared[1:]) and same_memory(inputs[0], y2)):
                return y2, out
    return np.empty((rows, cols), dtype=cdt), None


def _finish(y2, result, x_shape, rdt, out):
    if result is not None:
        return result
    y = y2.reshape(x_shape)
    if out is None:
        return y.astype(rdt)
    out[...] = y
    return out


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer normalization over the trailing ``normalized_shape`` dims, as torch.nn.functional.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance of each row.

    Parameters
    ----------
    x : array_like
        Input of shape ``(*, *normalized_shape)``.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over.
    weight, bias : array_like of shape ``normalized_shape``, optional
        The affine alpha (new standard deviation) and beta (new mean).
    eps : float
        Added to the variance.
    out : ndarray, optional
        Where to write the result: same shape as x and the result dtype; may be x itself.

    Returns
    -------
    ndarray in the input dtype (float16/32/64), float64 for integer and bool input.

    Notes
    -----
    Statistics are accumulated in float64 (block-wise corrected two-pass merged by Chan's
    formula), so float32 results stay within 1e-5 of the float64 reference even when the mean
    lies 1e6 standard deviations from zero.
    """
    x = as_array(x)
    cdt, rdt = dtypes(x.dtype, "layer_norm")
    nshape = _normalized_shape(normalized_shape)
    k = len(nshape)
    if x.ndim < k or x.shape[x.ndim - k:] != nshape:
        raise ValueError(
            f"Given normalized_shape={list(nshape)}, expected input with shape "
            f"[*, {', '.join(map(str, nshape))}], but got input of size {list(x.shape)}"
        )
    eps = real_scalar(eps, "eps")
    cols = math.prod(nshape)
    rows = math.prod(x.shape[: x.ndim - k])
    w = param(weight, "weight", nshape, cdt)
    b = param(bias, "bias", nshape, cdt)
    if x.size == 0:
        if out is None:
            return np.empty(x.shape, dtype=rdt)
        check_out(out, x.shape, rdt)
        return out
    x2 = as_rows(to_compute(x, cdt), rows, cols)
    w1 = None if w is None else w.reshape(cols)
    b1 = None if b is None else b.reshape(cols)
    y2, result = _output(x.shape, rows, cols, cdt, rdt, out, (x2, w1, b1))
    _kernels.layer_norm(x2, y2, w1, b1, None, None, eps, threads_for(x.size))
    return _finish(y2, result, x.shape, rdt, out)


def _column_moments(x2, n_threads):
    """Per-column (count, hi, lo, M2) of a 2-D (rows, F) array with unit inner stride."""
    rows, F = x2.shape
    T = max(1, min(n_threads, rows // COLUMN_ROWS_PER_THREAD))
    rows_per_block = max(8, min(1024, COLUMN_BLOCK_BYTES // max(1, F * x2.itemsize)))
    count = np.empty(T)
    parts = np.empty((3, T, F))
    scratch = np.empty((T, 3, F))
    _kernels.column_moments_into(x2, count, parts[0], parts[1], parts[2], scratch, rows_per_block)
    if T == 1:
        return count[0], parts[0, 0], parts[1, 0], parts[2, 0]
    return _merge(count, parts[0], parts[1], parts[2])


def _merge(count, hi, lo, m2):
    out = np.empty((3, hi.shape[1]))
    n = _kernels.merge_moments(count, hi, lo, m2, out[0], out[1], out[2])
    return n, out[0], out[1], out[2]


def _feature_moments(x, A, C, L, n_threads):
    """(count, mean hi, mean lo, M2) per feature c of x viewed as (A, C, L); float64 arrays.

    The mean is hi + lo (see pyx/_kernels.pyx): hi carries the magnitude, lo the remainder.
    """
    if L >= ROW_PATH_MIN:
        x2 = as_rows(x, A * C, L)
        parts = np.empty((3, A, C))
        _kernels.row_moments_into(x2, parts[0].reshape(-1), parts[1].reshape(-1),
                                  parts[2].reshape(-1), n_threads)
        if A == 1:
            return float(L), parts[0, 0], parts[1, 0], parts[2, 0]
        return _merge(np.full(A, float(L)), parts[0], parts[1], parts[2])
    n, hi, lo, m2 = _column_moments(as_rows(x, A, C * L), n_threads)
    if L == 1:
        return n, hi, lo, m2
    # merge the L positions of each channel: group l holds column l of every channel
    by_position = [np.ascontiguousarray(a.reshape(C, L).T) for a in (hi, lo, m2)]
    return _merge(np.full(L, n), *by_position)


def _buffer(value, name, C):
    """A running-statistics buffer: a writable floating ndarray of shape (C,), updated in place."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                        f"{type(value).__name__}")
    if value.shape != (C,):
        raise ValueError(f"{name} should contain {C} elements not {value.size}")
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
    return value


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None):
    """Batch normalization with the features on ``axis``, as torch.nn.functional.batch_norm.

    Training: normalizes each feature with the mean and biased variance over every other axis
    and, when ``running_mean`` / ``running_var`` are given, updates them in place with
    ``r = (1 - momentum) * r + momentum * batch`` (unbiased variance for running_var).
    Not training: normalizes with ``running_mean`` and ``running_var``.

    Parameters
    ----------
    x : array_like, at least 2-D
        (N, C), (N, C, L, ...) with ``axis=1``, or feature-last (N, T, C) with ``axis=-1``.
    running_mean, running_var : ndarray of shape (C,), optional
        Running statistics, updated in place when training.
    weight, bias : array_like of shape (C,), optional
        The affine alpha and beta.
    training : bool
    momentum : float
    eps : float
        Added to the variance; must be positive when training.
    axis : int
        The feature axis.
    out : ndarray, optional
        Where to write the result; may be x itself.

    Returns
    -------
    ndarray in the input dtype (float16/32/64), float64 for integer and bool input.

    Notes
    -----
    Statistics are accumulated in float64 and merged by Chan's formula; the mean is applied as
    a two-term split, so float32 results stay within 1e-5 of the float64 reference even for
    data whose mean lies 1e6 standard deviations from zero.
    """
    x = as_array(x)
    cdt, rdt = dtypes(x.dtype, "batch_norm")
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects an input with at least 2 dims, got shape {x.shape}")
    ax = feature_axis(axis, x.ndim)
    C = x.shape[ax]
    A = math.prod(x.shape[:ax])
    L = math.prod(x.shape[ax + 1:])
    n = A * L
    eps = real_scalar(eps, "eps")
    momentum = real_scalar(momentum, "momentum")
    training = bool(training)
    rm = _buffer(running_mean, "running_mean", C)
    rv = _buffer(running_var, "running_var", C)
    w = param(weight, "weight", (C,))
    b = param(bias, "bias", (C,))
    if training:
        if not eps > 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if n == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {x.shape}")
        if n == 0:
            raise ValueError(f"batch_norm cannot train on an empty batch, got input size {x.shape}")
        if (rm is None) != (rv is None):
            raise ValueError("running_mean and running_var must be given together")
        for buf, name in ((rm, "running_mean"), (rv, "running_var")):
            if buf is not None and not buf.flags.writeable:
                raise ValueError(f"{name} is read-only; it must be updated in place")
    elif rm is None or rv is None:
        raise ValueError("running_mean and running_var must be given when not training")

    if x.size == 0:
        if out is None:
            return np.empty(x.shape, dtype=rdt)
        check_out(out, x.shape, rdt)
        return out
    xc = to_compute(x, cdt)
    n_threads = threads_for(x.size)
    if training:
        count, hi, lo, m2 = _feature_moments(xc, A, C, L, n_threads)
        var = m2 / count
        if rm is not None:
            rm[...] = (1.0 - momentum) * rm + momentum * (hi + lo)
            rv[...] = (1.0 - momentum) * rv + momentum * (m2 / (count - 1.0))
    else:
        hi = np.ascontiguousarray(rm, dtype=np.float64)
        lo = np.zeros(C)
        var = np.ascontiguousarray(rv, dtype=np.float64)
    params = np.empty((4, C), dtype=cdt)
    _kernels.batch_norm_params(hi, lo, var, w, b, eps, params)
    if L >= ROW_PATH_MIN:
        x2 = as_rows(xc, A * C, L)
        y2, result = _output(x.shape, A * C, L, cdt, rdt, out, (x2,))
        _kernels.normalize_rows(x2, y2, params, n_threads)
    else:
        x2 = as_rows(xc, A, C * L)
        if L > 1:
            params = np.repeat(params, L, axis=1)
        y2, result = _output(x.shape, A, C * L, cdt, rdt, out, (x2,))
        _kernels.normalize_columns(x2, y2, params, n_threads)
    return _finish(y2, result, x.shape, rdt, out)
