"""The row norms' front end, shared by LayerNorm (centred) and RMSNorm (uncentred) and their
residual-add forms: the one validator of their inputs, the forward and backward calls.  The
public functions are in _layer_norm.py and _rms_norm.py; the kernels in pyx/core/rows.pxi."""
import math

import numpy as np

from ._isa import kernels as _kernels
from ._outputs import (_backward_results, _finish, _grad_like, _kernel_input,
                       _output, _overlaps_any, backward_kind, backward_outputs, backward_weight)
from ._threads import threads_for
from ._validation import (
    as_array,
    check_out,
    dtypes,
    empty,
    half_kind,
    layer_norm_shape,
    masked_output,
    normalized_shape as _normalized_shape,
    param,
    plain,
    real_scalar,
    row_mask as _row_mask,
    same_memory,
    saved as _saved,
    view_rows,
)

_F32 = np.dtype(np.float32)


def row_input(x, normalized_shape, op):
    """The one validator of a row norm's input: (x, compute dtype, result dtype,
    normalized_shape, rows, cols)."""
    fast = layer_norm_shape(x, normalized_shape)
    if fast is not None:  # float32 / float64 / float16 / bfloat16 over the last dim
        dt, nshape, rows, cols = fast
        return x, (_F32 if dt.itemsize == 2 else dt), dt, nshape, rows, cols
    if type(x) is not np.ndarray:
        x = as_array(x)
    cdt, rdt = dtypes(x.dtype, op)
    nshape = _normalized_shape(normalized_shape)
    shape = x.shape
    k = len(nshape)
    if len(shape) < k or shape[len(shape) - k:] != nshape:
        raise ValueError(
            f"Given normalized_shape={list(nshape)}, expected input with shape "
            f"[*, {', '.join(map(str, nshape))}], but got input of size {list(shape)}"
        )
    cols = nshape[0] if k == 1 else math.prod(nshape)
    rows = x.size // cols if cols else math.prod(shape[: len(shape) - k])
    return x, cdt, rdt, nshape, rows, cols


def rms_eps(eps, cdt):
    """RMSNorm's eps: None is the machine epsilon of the compute dtype (float32 for float16
    and float32 input, as torch's opmath type), else a real number."""
    if eps is None:
        return float(np.finfo(cdt).eps)
    return eps if type(eps) is float else real_scalar(eps, "eps")


def row_norm(op, centred, x, normalized_shape, weight, bias, eps, out, return_stats, mask,
             lengths):
    """layer_norm (centred) or rms_norm: (y, mean, rstd), the statistics None unless
    return_stats (mean None for rms_norm)."""
    x, cdt, rdt, nshape, rows, cols = row_input(x, normalized_shape, op)
    shape = x.shape
    eps, w, b, row_mask = _arguments(op, centred, shape, cdt, rdt, nshape, weight, bias, eps,
                                     out, mask, lengths)
    mean, rstd, stats = _stats(return_stats, centred, shape, nshape, rows)
    if x.size == 0:
        y = np.empty(shape, dtype=rdt) if out is None else out
        return y, mean, rstd
    half = half_kind(x.dtype)
    kdt = rdt if half >= 0 else cdt  # the dtype the kernel reads and writes
    x = _kernel_input(x, kdt, rows, cols)
    y, result, write_padding = _output(x, shape, rows, cols, kdt, rdt, out, (w, b),
                                       row_mask is not None)
    _call(centred, x, y, cols, w, b, stats, eps, threads_for(x.size), row_mask, write_padding,
          None, None, half)
    return _finish(y, result, shape, rdt, out), mean, rstd


def _arguments(op, centred, shape, cdt, rdt, nshape, weight, bias, eps, out, mask, lengths):
    """The checked (eps, weight, bias, row mask) of a forward call, and out checked."""
    if centred:
        if type(eps) is not float:
            eps = real_scalar(eps, "eps")
    else:
        eps = rms_eps(eps, cdt)
    # 16-bit input: parameters of its own dtype go to the kernels as they are (widened there
    # once a call), others in float32
    pdt = rdt if half_kind(rdt) >= 0 else cdt
    w = weight if pdt is not cdt and plain(weight, pdt, nshape) else param(weight, "weight",
                                                                           nshape, cdt)
    b = bias if pdt is not cdt and plain(bias, pdt, nshape) else param(bias, "bias", nshape,
                                                                       cdt)
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _row_mask(mask, lengths, shape[: len(shape) - len(nshape)], op)
    if out is not None:
        check_out(out, shape, rdt)
    return eps, w, b, row_mask


def _stats(return_stats, centred, shape, nshape, rows):
    """(mean, rstd) as returned (shape (*, 1, ..., 1), NaN until written) and as the kernel
    writes them (one per row), or Nones."""
    if not return_stats:
        return None, None, (None, None)
    batch = shape[: len(shape) - len(nshape)] + (1,) * len(nshape)
    if centred:
        both = np.full((2,) + batch, np.nan)
        return both[0], both[1], (both[0].reshape(rows), both[1].reshape(rows))
    rstd = np.full(batch, np.nan)
    return None, rstd, (None, rstd.reshape(rows))


def _call(centred, x, y, cols, w, b, stats, eps, threads, row_mask, write_padding, r, h,
          half=-1):
    mean, rstd = stats
    if half >= 0:  # 16-bit arrays: the kernels take their bits
        if centred:
            _kernels.layer_norm(x, y, cols, w, b, mean, rstd, eps, threads, row_mask,
                                write_padding, r, h, half)
        else:
            _kernels.rms_norm(x, y, cols, w, rstd, eps, threads, row_mask, write_padding, r, h,
                              half)
        return
    if centred:
        _kernels.layer_norm(x, y, cols, w, b, mean, rstd, eps, threads, row_mask,
                            write_padding, r, h)
    else:
        _kernels.rms_norm(x, y, cols, w, rstd, eps, threads, row_mask, write_padding, r, h)


def add_row_norm(op, centred, x, residual, normalized_shape, weight, bias, eps, out,
                 residual_out, return_stats, mask, lengths):
    """add_layer_norm (centred) or add_rms_norm: (y, h, mean, rstd), h = x + residual."""
    x, cdt, rdt, nshape, rows, cols = row_input(x, normalized_shape, op)
    r = as_array(residual, "residual")
    shape = x.shape
    if r.shape != shape:
        raise ValueError(f"{op}: residual must have the shape of x, {shape}, got {r.shape}")
    if r.dtype != x.dtype:
        raise TypeError(f"{op}: residual must have the dtype of x, {x.dtype}, got {r.dtype}")
    if residual_out is not None:
        check_out(residual_out, shape, x.dtype)
        if out is not None and np.may_share_memory(out, residual_out):
            raise ValueError(f"{op}: out and residual_out must not overlap")
    half = half_kind(x.dtype)
    kdt = rdt if half >= 0 else cdt  # the dtype the kernel reads and writes
    if half < 0 and (x.dtype is not cdt or not x.dtype.isnative):
        # integers, bool, byte-swapped: h in x's dtype (torch's add), then the norm
        h = np.add(x, r, out=residual_out)
        y, mean, rstd = row_norm(op, centred, h, nshape, weight, bias, eps, out, return_stats,
                                 mask, lengths)
        return y, h, mean, rstd
    eps, w, b, row_mask = _arguments(op, centred, shape, cdt, rdt, nshape, weight, bias, eps,
                                     out, mask, lengths)
    mean, rstd, stats = _stats(return_stats, centred, shape, nshape, rows)
    if x.size == 0:
        h = np.empty(shape, dtype=rdt) if residual_out is None else residual_out
        y = np.empty(shape, dtype=rdt) if out is None else out
        return y, h, mean, rstd
    xk = _kernel_input(x, kdt, rows, cols)
    rk = _kernel_input(r, kdt, rows, cols)
    inputs = (xk, rk)
    h = _target(residual_out, rows, cols, inputs, (w, b))
    if h is None:
        h = empty(shape, kdt, xk)
    write_padding = True
    if out is None and row_mask is not None:
        y, write_padding = masked_output(shape, kdt, xk)
    else:
        y = _target(out, rows, cols, inputs, (w, b))
        if y is None:
            y = empty(shape, kdt, xk)
    _call(centred, xk, y, cols, w, b, stats, eps, threads_for(x.size), row_mask,
          write_padding, rk, h, half)
    return _result(y, out, shape), _result(h, residual_out, shape), mean, rstd


def _target(a, rows, cols, inputs, params):
    """A view of the caller's array a the kernel can write as (rows, cols), or None (also for
    a None): when a has no such view, overlaps a parameter, or overlaps one of the inputs
    other than as exactly its elements (rows are read in full before they are written)."""
    if a is None or _overlaps_any(a, params):
        return None
    v = a if a.flags.c_contiguous else view_rows(a, rows, cols)
    if v is None:
        return None
    v2 = v.reshape(rows, cols) if v.ndim != 2 else v
    for i in inputs:
        if np.may_share_memory(a, i):
            i2 = i.reshape(rows, cols) if i.ndim != 2 else i
            if not same_memory(i2, v2):
                return None
    return v


def _result(written, given, shape):
    """The output as returned: the caller's array (written, or copied into), or the fresh one."""
    if given is None:
        return written.reshape(shape)
    if not np.may_share_memory(written, given):  # a fresh array: copied into the caller's
        given[...] = written.reshape(shape)
    return given


def row_norm_backward(op, centred, grad_out, x, mean, rstd, normalized_shape, weight, bias,
                      mask, lengths, grad_residual):
    """layer_norm_backward (centred) or rms_norm_backward: (dx, dw, db)."""
    x, cdt, rdt, nshape, rows, cols = row_input(x, normalized_shape, op)
    half = backward_kind(rdt, grad_out, grad_residual)
    kdt = rdt if half >= 0 else cdt  # the dtype the kernel reads and writes
    g = _grad_like(grad_out, x, kdt, rows, cols)
    gr = None if grad_residual is None else _grad_like(grad_residual, x, kdt, rows, cols)
    w = backward_weight(weight, nshape, cdt, rdt, half)
    if bias is not None:
        param(bias, "bias", nshape, cdt)
    if centred:
        mean = _saved(mean, "mean", rows)
    rstd = _saved(rstd, "rstd", rows)
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _row_mask(mask, lengths, x.shape[: x.ndim - len(nshape)], op)
    dx, grad_w, grad_b = backward_outputs(x, cdt, rdt, half, nshape, w is not None,
                                          bias is not None)
    xk = _kernel_input(x, kdt, rows, cols)
    if centred:
        _kernels.layer_norm_backward(g, xk, dx, cols, w, mean, rstd, grad_w, grad_b,
                                     threads_for(x.size), row_mask, gr, half)
    else:
        _kernels.rms_norm_backward(g, xk, dx, cols, w, rstd, grad_w, threads_for(x.size),
                                   row_mask, gr, half)
    return _backward_results(rdt, cdt, dx, grad_w, weight, grad_b, bias)
