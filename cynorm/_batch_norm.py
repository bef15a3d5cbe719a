"""BatchNorm: ``batch_norm`` and ``batch_norm_backward`` (torch.nn.functional semantics), with
the per-feature statistics they share with cynorm.moments.  Kernels: pyx/ops/batch_norm.pxi,
batch_norm_backward.pxi and moments.pxi.  The layers are in _batch_norm_layers.py."""
import math

import numpy as np

from ._isa import kernels as _kernels
from ._outputs import (_backward_results, _finish, _grad_like, _kernel_input,
                       _output, _rows_of, backward_kind, backward_outputs, backward_weight)
from ._runtime import POLICY
from ._threads import threads_for
from ._validation import (
    as_array,
    check_out,
    dtypes,
    feature_axis,
    half_kind,
    is_bfloat16,
    param,
    plain,
    real_scalar,
    row_mask as _row_mask,
    saved as _saved,
    to_compute,
)

__all__ = ["batch_norm", "batch_norm_backward"]


# The policy table's thresholds (pyx/policy.h says why): BatchNorm on (A, C, L) reduces rows of
# L >= ROW_PATH_MIN one by one, shorter ones down the columns of (A, C*L); it runs serially
# below BATCH_NORM_SERIAL_BELOW elements; its column blocks hold about COLUMN_BLOCK_BYTES.
ROW_PATH_MIN = POLICY["row_path_min"]


BATCH_NORM_SERIAL_BELOW = POLICY["batch_norm_serial_below"]


COLUMN_BLOCK_BYTES = POLICY["column_block_bytes"]


def _batch_norm_input(x, axis, op):
    """The one validator of BatchNorm inputs: (x, compute dtype, result dtype, C, A, L) with x
    viewed as (A, C, L) around the feature axis."""
    if type(x) is not np.ndarray:
        x = as_array(x)
    cdt, rdt = dtypes(x.dtype, op)
    shape = x.shape
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"{op} expects an input with at least 2 dims, got shape {shape}")
    ax = axis if type(axis) is int and 0 <= axis < ndim else feature_axis(axis, ndim)
    C = shape[ax]
    if ndim == 2:
        A, L = (shape[0], 1) if ax == 1 else (1, shape[1])
    else:
        A = math.prod(shape[:ax])
        L = math.prod(shape[ax + 1:])
    return x, cdt, rdt, C, A, L


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False, mask=None,
               lengths=None):
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
    return_stats : bool
        Also return the per-feature ``mean`` and ``invstd = 1 / sqrt(var + eps)`` (float64,
        shape (C,)) used to normalize, for batch_norm_backward.
    mask : bool array ``x.shape[:-1]``, optional
        For feature-last input (``axis=-1``, e.g. (N, T, C)): True for real tokens.  Statistics
        (and the running update) use the real tokens only; padding positions of the output are
        written as 0.
    lengths : int array (N,), optional
        Instead of mask, for (N, T, C) input: sequence n has lengths[n] real tokens.

    Returns
    -------
    ndarray in the input dtype (float16/32/64), float64 for integer and bool input; with
    return_stats, the tuple (y, mean, invstd).

    Notes
    -----
    Statistics are accumulated in float64 and merged by Chan's formula; the mean is applied as
    a two-term split, so float32 results stay within 1e-5 of the float64 reference even for
    data whose mean lies 1e6 standard deviations from zero.  In training on float32 input
    reduced down columns ((N, C), feature-last (N, T, C), and (N, C, L) with short L), groups
    of 16 rows are first summed in float32 (scaled deviations from the running mean): the
    statistics, and so ``return_stats`` and the running update, are then good to about 1e-7
    relative, float32's own precision (a few 1e-7 when the batch changes regime part-way).
    """
    if type(x) is not np.ndarray:
        x = as_array(x)
    if x.ndim == 1 and x.size == 0:  # torch returns it as it is, in both modes
        return _batch_norm_empty_1d(x, training, eps, out, return_stats)
    x, cdt, rdt, C, A, L = _batch_norm_input(x, axis, "batch_norm")
    shape = x.shape
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _feature_last_mask(mask, lengths, shape, L, "batch_norm")
        n_real = int(np.count_nonzero(row_mask))
    n = A * L
    if type(eps) is not float:
        eps = real_scalar(eps, "eps")
    if type(momentum) is not float:
        momentum = real_scalar(momentum, "momentum")
    training = bool(training)
    direct = False  # eval with running statistics the kernel reads as they are
    if training:
        rm = _buffer(running_mean, "running_mean", C)
        rv = _buffer(running_var, "running_var", C)
    else:
        rm, rv = running_mean, running_var
        if rm is None or rv is None:
            raise ValueError("running_mean and running_var must be given when not training")
        direct = plain(rm, cdt, (C,)) and plain(rv, cdt, (C,))
        if not direct:
            _check_running(rm, "running_mean", C)
            _check_running(rv, "running_var", C)
    w = param(weight, "weight", (C,), cdt)
    b = param(bias, "bias", (C,), cdt)
    if out is not None:
        check_out(out, shape, rdt)
    if training:
        check_training_eps(eps)
        if n == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {shape}")
        if row_mask is not None and n_real < 2 and n > 0:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{n_real} real token{'' if n_real == 1 else 's'} (the mask marks "
                             "the rest as padding)")
        if (rm is None) != (rv is None):
            raise ValueError("running_mean and running_var must be given together")

    if x.size == 0:  # an empty batch: nothing to normalize, the running statistics unchanged
        y = np.empty(shape, dtype=rdt) if out is None else out
        if return_stats:
            mean, var = (np.full(C, np.nan), np.full(C, np.nan)) if training else (
                np.asarray(rm, np.float64), np.asarray(rv, np.float64))
            return y, mean, _invstd(var, eps)
        return y
    half = half_kind(x.dtype)   # 16-bit x: its output from the kernels' 16-bit affine
    x16 = x if half >= 0 else None
    n_threads = threads_for(x.size, BATCH_NORM_SERIAL_BELOW)
    rows, cols, by_rows = _layout(A, C, L)
    if half >= 0 and not training:
        stats = _running_stats(rm, rv, C)
        y = _apply_half(x16, shape, rows, cols, by_rows, half, stats, 1.0, w, b, eps,
                        n_threads, out, row_mask)
        if return_stats:
            return y, stats[0].copy(), _invstd(stats[2], eps)
        return y
    if half >= 0:   # 16-bit x: its moments from the kernels too
        x = _rows_of(x16, rows, cols)
    else:
        x = _rows_of(to_compute(x, cdt), rows, cols)
    if not training and direct:
        y, result, write_padding = _output(x, shape, rows, cols, cdt, rdt, out, (),
                                           row_mask is not None)
        _kernels.normalize_running(x, y, rows, cols, by_rows, rm, rv, w, b, eps, n_threads,
                                   row_mask, write_padding)
        y = _finish(y, result, shape, rdt, out)
        if return_stats:
            return y, rm.astype(np.float64), _invstd(rv.astype(np.float64), eps)
        return y
    rest = None
    if training:
        if half >= 0 and by_rows:   # the means' exact remainders, for the 16-bit output
            rest = np.empty(C)
        count, stats = _feature_moments(x, rows, cols, C, by_rows, n_threads, row_mask,
                                        fast=True, half=half, rest=rest)
        scaled = None
        if count < 0:  # statistics beyond the float range: those features redone scaled
            count = -count
            if half >= 0:   # the rescue works on a float32 copy of 16-bit x
                x = _rows_of(to_compute(x16, cdt), rows, cols)
            scaled = _rescaled(x, A, C, L, rows, cols, by_rows, n_threads, row_mask, stats)
        if rm is not None:
            _update_running(rm, rv, stats, count, momentum)
        var_scale = 1.0 / count
        if scaled is not None:
            # normalize the scaled copy with its own statistics: the same output, no overflow
            xs, stats_s, s = scaled
            y = _apply_stats(xs, shape, rows, cols, by_rows, cdt, rdt,
                             _scaled_params_stats(stats_s, count, eps, s), 1.0, w, b, 0.0,
                             n_threads, out, row_mask)
            if return_stats:
                return y, stats[0] + stats[1], _invstd(stats_s[2] / count + eps * s * s, 0.0) * s
            return y
    else:
        stats = _running_stats(rm, rv, C)
        var_scale = 1.0
    if x16 is not None:
        y = _apply_half(x16, shape, rows, cols, by_rows, half, stats, var_scale, w, b, eps,
                        n_threads, out, row_mask, rest)
    else:
        y = _apply_stats(x, shape, rows, cols, by_rows, cdt, rdt, stats, var_scale, w, b, eps,
                         n_threads, out, row_mask)
    if return_stats:
        return y, stats[0] + stats[1], _invstd(stats[2] * var_scale, eps)
    return y


def _running_stats(rm, rv, C):
    """The running statistics as float64 stats (3, C), as the moments give them: the mean as
    hi + lo (lo 0) and the variance (var_scale 1)."""
    stats = np.empty((3, C))
    stats[0] = rm
    stats[1] = 0.0
    stats[2] = rv
    return stats


def _update_running(rm, rv, stats, count, momentum):
    """r = (1 - momentum) r + momentum batch in float64, rounded once into each buffer's dtype
    (running_var gets the unbiased variance).  The kernel takes float32 / float64 / float16 /
    bfloat16 buffers of one dtype, native and contiguous; any other floating buffer (two
    dtypes, say) NumPy updates."""
    dt = rm.dtype
    if dt == rv.dtype and dt.isnative and rm.flags.c_contiguous and rv.flags.c_contiguous:
        half = -1 if dt.char in "fd" else half_kind(dt)
        if dt.char in "fd" or half >= 0:
            _kernels.update_running(rm, rv, stats, count, momentum, half)
            return
    rm[...] = (1.0 - momentum) * rm.astype(np.float64) + momentum * (stats[0] + stats[1])
    rv[...] = (1.0 - momentum) * rv.astype(np.float64) + momentum * (stats[2] * (1.0 / (count - 1.0)))


def check_training_eps(eps):
    """torch's check: training normalizes with batch statistics, which need eps > 0."""
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")


def _batch_norm_empty_1d(x, training, eps, out, return_stats):
    """batch_norm of a 1-D input with no elements: an empty result, as torch gives (other 1-D
    input is an error).  The dtype and eps are checked as for any input."""
    _, rdt = dtypes(x.dtype, "batch_norm")
    if training:
        check_training_eps(real_scalar(eps, "eps"))
    if out is not None:
        check_out(out, x.shape, rdt)
    y = np.empty(x.shape, dtype=rdt) if out is None else out
    return (y, np.empty(0), np.empty(0)) if return_stats else y


def _layout(A, C, L):
    """(rows, cols, by_rows): how the kernels walk x viewed as (A, C, L)."""
    if L >= ROW_PATH_MIN:
        return A * C, L, True
    return A, C * L, False


def _feature_moments(x, rows, cols, C, by_rows, n_threads, row_mask=None, fast=False, half=-1,
                     rest=None):
    """(count, stats) per feature of x laid out as _layout says: stats (3, C) float64 holds
    the mean as hi + lo (hi carries the magnitude, lo the remainder; see pyx/core/moments.pxi)
    and M2.  A negative count says some M2 is not finite (overflow, or inf / NaN in x).
    fast: float32 columns summed in float32 groups, M2 to about 1e-7 relative (enough for a
    float32 output; the moments API and the scaler keep float64 sums).  half: x is 16-bit
    (that kind), widened to float32 in the kernel as it is read.  rest ((C,) float64, 16-bit
    x by rows): filled with each feature's exact mean remainder, for _apply_half.
    """
    stats = np.empty((3, C))
    rows_per_block = max(8, min(1024, COLUMN_BLOCK_BYTES // (cols * x.itemsize)))
    n = _kernels.feature_moments(x, rows, cols, C, by_rows, stats, n_threads, rows_per_block,
                                 row_mask, fast, half, rest)
    return n, stats


def _buffer(value, name, C):
    """A running-statistics buffer: a writable floating ndarray of shape (C,), updated in place."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                        f"{type(value).__name__}")
    if value.shape != (C,):
        raise ValueError(f"{name} should contain {C} elements not {value.size}")
    if value.dtype.kind != "f" and not is_bfloat16(value.dtype):
        raise TypeError(f"{name} must be a floating array, got dtype {value.dtype}")
    if not value.flags.writeable:
        raise ValueError(f"{name} is read-only; it must be updated in place")
    return value


def _check_running(value, name, C):
    """Eval-mode running statistics (any array_like, read only) must hold C values."""
    if (value.shape if type(value) is np.ndarray else np.shape(value)) != (C,):
        raise ValueError(f"{name} should contain {C} elements not {np.size(value)}")


def _rescaled(x, A, C, L, rows, cols, by_rows, n_threads, row_mask, stats):
    """Features whose M2 overflowed float64 (|x| near 1e154 and beyond, float64 input) or
    whose deviations may overflow float32 (within a factor 2 of its maximum), redone on x
    times 2^-k per feature (exact).  Fills stats with the unscaled moments (an M2
    beyond float64 becomes inf) and returns (scaled x laid out as x, scaled stats, 2^-k per
    feature); None when no feature can be rescued (they hold inf or NaN)."""
    x3 = np.asarray(x).reshape(A, C, L)
    real = x3 if row_mask is None else x3[row_mask.reshape(A)]
    amax = np.max(np.abs(real), axis=(0, 2)) if real.size else np.zeros(C)
    big = _kernels.FLOAT32_BIG_M2 if x.dtype == np.float32 else np.finfo(np.float64).max
    bad = ~(stats[2] <= big) & np.isfinite(amax) & (amax > 0)
    if not bad.any():
        return None
    _, e = np.frexp(np.where(bad, amax, 1.0))
    s = np.where(bad, np.ldexp(1.0, -e.astype(np.int64) + 1), 1.0)  # largest becomes [1, 2)
    xs = _rows_of(np.ascontiguousarray(x3 * s.reshape(1, C, 1), dtype=x.dtype), rows, cols)
    n, stats_s = _feature_moments(xs, rows, cols, C, by_rows, n_threads, row_mask)
    with np.errstate(over="ignore"):
        stats[0] = np.where(bad, stats_s[0] / s, stats[0])
        stats[1] = np.where(bad, stats_s[1] / s, stats[1])
        stats[2] = np.where(bad, stats_s[2] / s / s, stats[2])
    return xs, stats_s, s


def _scaled_params_stats(stats_s, count, eps, s):
    """(3, C) stats for _apply_stats with eps=0: the scaled mean and var + eps, both times s."""
    out = stats_s.copy()
    out[2] = stats_s[2] / count + eps * s * s
    return out


def _apply_stats(x, shape, rows, cols, by_rows, cdt, rdt, stats, var_scale, w, b, eps,
                 n_threads, out=None, row_mask=None):
    """y = (x - mean) * weight / sqrt(var + eps) + bias, from float64 stats (3, C): the mean as
    hi + lo and the variance times 1 / var_scale; x already laid out as _layout says."""
    C = stats.shape[1]
    params = np.empty((3, C), dtype=cdt)
    _kernels.batch_norm_params(stats, var_scale, w, b, eps, params)
    y, result, write_padding = _output(x, shape, rows, cols, cdt, rdt, out, (),
                                       row_mask is not None)
    _kernels.normalize(x, y, rows, cols, by_rows, params, n_threads, row_mask, write_padding)
    return _finish(y, result, shape, rdt, out)


def _apply_half(x, shape, rows, cols, by_rows, kind, stats, var_scale, w, b, eps, n_threads,
                out=None, row_mask=None, rest=None):
    """_apply_stats for 16-bit x (float16, bfloat16: kind), read and written by the kernels in
    its own dtype (core/halves.pxi's affine_half: its parameters made there from the float64
    statistics; rest: _feature_moments' exact mean remainders, or None)."""
    rdt = x.dtype
    x = _kernel_input(x, rdt, rows, cols)
    y, result, write_padding = _output(x, shape, rows, cols, rdt, rdt, out, (),
                                       row_mask is not None)
    _kernels.affine_half(x, y, rows, cols, by_rows, stats, var_scale, w, b, eps, kind,
                         n_threads, row_mask, write_padding, rest)
    return _finish(y, result, shape, rdt, out)


def _batch_norm_with_stats(x, stats, weight, bias, eps, axis):
    """Normalize x with float64 stats (3, C): mean hi, mean lo, variance (e.g. the moments of
    a larger whole, which a rounded float64 mean would lose precision of)."""
    x, cdt, rdt, C, A, L = _batch_norm_input(x, axis, "batch_norm")
    w = param(weight, "weight", (C,), cdt)
    b = param(bias, "bias", (C,), cdt)
    shape = x.shape
    if x.size == 0:
        return np.empty(shape, dtype=rdt)
    x = to_compute(x, cdt)
    rows, cols, by_rows = _layout(A, C, L)
    x = _rows_of(x, rows, cols)
    stats = np.ascontiguousarray(stats, dtype=np.float64)
    return _apply_stats(x, shape, rows, cols, by_rows, cdt, rdt, stats, 1.0, w, b, eps,
                        threads_for(x.size, BATCH_NORM_SERIAL_BELOW))


def _feature_last_mask(mask, lengths, shape, L, op):
    if L != 1:
        raise ValueError(f"{op}: mask and lengths need the features on the last axis "
                         f"(axis=-1, e.g. (N, T, C) input), got input of shape {shape}")
    return _row_mask(mask, lengths, shape[:-1], op)


def _invstd(var, eps):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(var + eps)


def batch_norm_backward(grad_out, x, mean, invstd, weight=None, training=True, *, axis=1,
                        bias=None, mask=None, lengths=None):
    """Gradients of batch_norm: (grad_input, grad_weight, grad_bias).

    ``mean`` and ``invstd`` (C,) are what ``batch_norm(..., return_stats=True)`` returned: the
    batch statistics in training, the running ones in eval (constants there:
    ``dx = grad_out * weight * invstd``).  grad_weight is None without ``weight``, grad_bias
    None without ``bias`` (only its presence matters).  Sums are accumulated in float64.
    With ``mask`` / ``lengths`` (as in batch_norm), padding positions get a zero gradient and are
    left out of the sums and counts.
    """
    if type(x) is not np.ndarray:
        x = as_array(x)
    if x.ndim == 1 and x.size == 0:  # the gradients of batch_norm's empty 1-D result
        return _batch_norm_backward_empty_1d(grad_out, x, weight, bias)
    x, cdt, rdt, C, A, L = _batch_norm_input(x, axis, "batch_norm_backward")
    rows, cols, by_rows = _layout(A, C, L)
    half = backward_kind(rdt, grad_out)
    kdt = rdt if half >= 0 else cdt  # the dtype the kernel reads and writes
    g = _grad_like(grad_out, x, kdt, rows, cols)
    w = backward_weight(weight, (C,), cdt, rdt, half)
    if bias is not None:
        param(bias, "bias", (C,), cdt)
    mean = _saved(mean, "mean", C)
    invstd = _saved(invstd, "invstd", C)
    training = bool(training)
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _feature_last_mask(mask, lengths, x.shape, L, "batch_norm_backward")
    dx, grad_w, grad_b = backward_outputs(x, cdt, rdt, half, (C,), w is not None,
                                          bias is not None)
    if x.size:
        _kernels.batch_norm_backward(g, _kernel_input(x, kdt, rows, cols), dx, rows, cols, C,
                                     by_rows, mean, invstd, w, training, grad_w, grad_b,
                                     threads_for(x.size, BATCH_NORM_SERIAL_BELOW), row_mask,
                                     half)
    else:  # sums over nothing (torch gives zeros, also after an empty training batch)
        if grad_w is not None:
            grad_w[...] = 0.0
        if grad_b is not None:
            grad_b[...] = 0.0
    return _backward_results(rdt, cdt, dx, grad_w, weight, grad_b, bias)


def _batch_norm_backward_empty_1d(grad_out, x, weight, bias):
    cdt, rdt = dtypes(x.dtype, "batch_norm_backward")
    _grad_like(grad_out, x, cdt, 0, 1)  # checked as for any input; nothing to read
    sums = [None if p is None else np.zeros(np.shape(p), dtype=cdt) for p in (weight, bias)]
    return _backward_results(rdt, cdt, np.empty(x.shape, dtype=cdt), sums[0], weight, sums[1],
                             bias)
