"""The kernels' arrays: inputs as the kernels read them, outputs as they write them (a fresh
array, out=, or in place), and the result in the caller's dtype.  Shared by every op."""
import numpy as np

from ._validation import (as_array, as_rows, cast, empty, grad_outputs, half_kind, is_real,
                          masked_output, param, plain, same_memory, to_compute, view_rows)

_F32 = np.dtype(np.float32)


def _rows_of(a, rows, cols):
    """a itself when C-contiguous (the kernels take any ndim), else a 2-D view or copy."""
    if a.flags.c_contiguous:
        return a
    return as_rows(a, rows, cols)


def _kernel_input(a, cdt, rows, cols):
    """a in the compute dtype, as the kernels read it: a itself when it already is (one
    C-level check), else converted and seen as (rows, cols)."""
    if plain(a, cdt, a.shape):
        return a
    return _rows_of(to_compute(a, cdt), rows, cols)


def _output(x, shape, rows, cols, cdt, rdt, out, params, masked=False):
    """(array the kernel writes, the array to return or None to cast / copy into out, whether
    the kernel must write the padding rows' zeros itself).

    The kernel writes straight into ``out`` when it has the compute dtype, a (rows, cols) view
    with contiguous rows, and shares no memory with the inputs, or is exactly x (in place).
    """
    if out is None:
        if masked:
            y, write_padding = masked_output(shape, cdt, x)
            return y, (y if rdt is cdt else None), write_padding
        y = empty(shape, cdt, x)
        return y, (y if rdt is cdt else None), True
    if rdt is cdt and not _overlaps_any(out, params):
        if out is x:
            return out, out, True  # in place on a C-contiguous x
        y2 = out if out.flags.c_contiguous else view_rows(out, rows, cols)
        if y2 is not None:
            if not np.may_share_memory(out, x):
                return y2, out, True
            x2 = x if x.ndim == 2 or not x.flags.c_contiguous else x.reshape(rows, cols)
            y2v = y2 if y2.ndim == 2 else y2.reshape(rows, cols)
            if same_memory(x2, y2v):
                return y2, out, True
    return empty((rows, cols), cdt, x), None, True


def _overlaps_any(out, params):
    """Whether out may share memory with one of the (optional) parameter arrays."""
    for p in params:
        if p is not None and np.may_share_memory(out, p):
            return True
    return False


def _finish(y, result, shape, rdt, out):
    if result is not None:
        return result
    y = y.reshape(shape)
    if out is None:
        return cast(y, rdt)
    out[...] = y
    return out


def _grad_like(grad_out, x, cdt, rows, cols):
    """grad_out checked against x's shape, in the compute dtype, as the kernels read it (seen
    as (rows, cols) unless C-contiguous)."""
    if plain(grad_out, cdt, x.shape):
        return grad_out
    g = as_array(grad_out, "grad_out")
    if g.shape != x.shape:
        raise ValueError(f"grad_out must have the shape of x, {x.shape}, got {g.shape}")
    if not is_real(g.dtype):
        raise TypeError(f"grad_out must be a real numeric array, got dtype {g.dtype}")
    return _rows_of(to_compute(g, cdt), rows, cols)


def backward_kind(rdt, *grads):
    """The 16-bit kind (core/halves.pxi) in which a backward kernel reads x and the gradients
    and writes dx: that of x's dtype rdt (float16, bfloat16) when every gradient given (None:
    absent) has rdt too, else -1: they go through the compute dtype."""
    half = half_kind(rdt)
    if half >= 0:
        for g in grads:
            if g is not None and getattr(g, "dtype", None) != rdt:
                return -1
    return half


def backward_weight(weight, shape, cdt, rdt, half):
    """weight as a backward kernel reads it: a C-contiguous one of x's 16-bit dtype as it is
    (half >= 0: the kernel widens it), else checked and in the compute dtype."""
    if half >= 0 and plain(weight, rdt, shape):
        return weight
    return param(weight, "weight", shape, cdt)


def backward_outputs(x, cdt, rdt, half, param_shape, weight, bias):
    """(dx, grad_weight, grad_bias) as a backward kernel writes them (the last two None unless
    asked for): all in the compute dtype, or with half >= 0, dx in x's 16-bit dtype and the
    parameter gradients in float32."""
    if half < 0:
        return grad_outputs(x, cdt, param_shape, weight, bias)
    return (empty(x.shape, rdt, x), np.empty(param_shape, cdt) if weight else None,
            np.empty(param_shape, cdt) if bias else None)


def _backward_results(rdt, cdt, dx, grad_w, weight, grad_b, bias):
    """(dx, grad_w, grad_b) computed in cdt, in the result dtype rdt; with 16-bit input, a
    float32 parameter's gradient stays float32 (torch's mixed-precision rule: a parameter's
    gradient has the parameter's dtype)."""
    if rdt is cdt:
        return dx, grad_w, grad_b
    half = half_kind(rdt) >= 0

    def param_grad(grad, p):
        if grad is None:
            return None
        if half and getattr(p, "dtype", None) == _F32:
            return grad
        return cast(grad, rdt)

    if dx.dtype != rdt:   # (the 16-bit kernels write dx in rdt already)
        dx = cast(dx, rdt)
    return dx, param_grad(grad_w, weight), param_grad(grad_b, bias)
