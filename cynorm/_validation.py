"""Argument checks and the dtype policy, shared by every public function and layer.

Dtype policy (NumPy's rule for ``mean``): float32 and float64 are computed natively; float16
and bfloat16 (ml_dtypes' dtype, recognized without importing ml_dtypes) are computed in
float32 and returned in their own dtype (the row norms read and write them in the kernels,
the other ops convert); bool and integers are computed and returned in float64; anything else
(complex, object, strings, datetimes, long double) is a TypeError.
"""
import operator

import numpy as np

from ._isa import kernels as _kernels
from ._runtime import (empty, grad_outputs, layer_norm_shape, masked_output, note_bfloat16, plain,
                       plain_size)
from ._threads import threads_for

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)


def as_array(x, name="input"):
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}: {exc}") from None


_BF16: list[np.dtype] = []  # ml_dtypes' bfloat16 dtype object, once one has been recognized


def is_bfloat16(dtype):
    """Whether dtype is ml_dtypes' bfloat16 (by its name and module: ml_dtypes not imported;
    the first native one recognized is kept, found by identity from then on)."""
    if _BF16 and dtype is _BF16[0]:
        return True
    if dtype.kind != "V" or dtype.itemsize != 2 or dtype.name != "bfloat16":
        return False
    if not getattr(dtype.type, "__module__", "").startswith("ml_dtypes"):
        return False
    if dtype.isnative and not _BF16:
        _BF16.append(dtype)
        note_bfloat16(dtype)
    return True


def is_half(dtype):
    """Whether dtype is a 16-bit float the kernels read and write (float16, bfloat16), in
    native byte order."""
    return dtype.itemsize == 2 and dtype.isnative and (dtype.kind == "f" or is_bfloat16(dtype))


def half_kind(dtype):
    """The kernels' 16-bit kind for a float16 or bfloat16 dtype (read and written by the
    kernels), or -1 for any other dtype."""
    if not is_half(dtype):
        return -1
    return _kernels.HALF_BFLOAT16 if dtype.kind == "V" else _kernels.HALF_FLOAT16


def cast(a, dtype):
    """a converted to dtype (a new array): float32 to or from float16 / bfloat16 by the
    kernels' conversions (F16C, rounding to nearest even, on several threads) when a is
    C-contiguous, anything else by astype."""
    if a.flags.c_contiguous and a.size:
        kind = half_kind(dtype) if a.dtype is _F32 else (
            half_kind(a.dtype) if dtype is _F32 else -1)
        if kind >= 0:
            out = empty(a.shape, dtype, a)   # large ones from the output cache
            _kernels.convert_half(a, out, kind, threads_for(a.size))
            return out
    return a.astype(dtype)


def is_real(dtype):
    """Whether dtype is bool, an integer or a real float (bfloat16 included)."""
    return dtype.kind in "biuf" or is_bfloat16(dtype)


def dtypes(dtype, op):
    """(compute dtype, result dtype) for an input dtype, or TypeError naming it."""
    if dtype is _F32 or dtype is _F64:
        return dtype, dtype
    kind = dtype.kind
    if kind == "f" and dtype.itemsize in (4, 8):
        native = _F32 if dtype.itemsize == 4 else _F64
        return native, native
    if kind == "f" and dtype.itemsize == 2:
        return _F32, _F16
    if kind in "biu":
        return _F64, _F64
    if is_bfloat16(dtype):
        return _F32, dtype
    raise TypeError(
        f"cynorm.{op}: unsupported dtype {dtype}; expected float16, bfloat16, float32, "
        "float64, an integer or a bool array"
    )


def to_compute(x, cdt):
    """x in the compute dtype (native byte order): the array itself when it already is."""
    if x.dtype is cdt or (x.dtype == cdt and x.dtype.isnative):
        return x
    # byte-swapped, float16, bfloat16, integers, bool
    return cast(x, cdt)


def as_rows(a, rows, cols):
    """A 2-D (rows, cols) view of a with unit inner stride, or a C-contiguous copy."""
    a2 = a.reshape(rows, cols)
    if (cols > 1 and a2.strides[1] != a2.itemsize) or a2.strides[0] % a2.itemsize:
        a2 = np.ascontiguousarray(a2)
    return a2


def view_rows(a, rows, cols):
    """A writable 2-D view of a with unit inner stride, or None when a has no such view."""
    try:
        a2 = np.reshape(a, (rows, cols), copy=False)
    except (ValueError, TypeError):
        return None
    if (cols > 1 and a2.strides[1] != a2.itemsize) or a2.strides[0] % a2.itemsize:
        return None
    return a2


def param(value, name, shape, cdt=_F64):
    """weight / bias / running statistics as a C-contiguous array of the given shape and dtype."""
    if value is None:
        return None
    if plain(value, cdt, shape):
        return value
    arr = as_array(value, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not is_real(arr.dtype):
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=cdt)


def check_out(out, shape, rdt):
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"out must have shape {shape}, got {out.shape}")
    if out.dtype != rdt:
        raise TypeError(f"out must have dtype {rdt}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def same_memory(a, b):
    """True when a and b are the same elements (in-place operation)."""
    ia, ib = a.__array_interface__, b.__array_interface__
    return ia["data"][0] == ib["data"][0] and a.strides == b.strides and a.shape == b.shape


def normalized_shape(value):
    if type(value) is int and value >= 0:
        return (value,)
    if type(value) is tuple and len(value) == 1 and type(value[0]) is int and value[0] >= 0:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        shape = (operator.index(value),)
    else:
        try:
            shape = tuple(operator.index(v) for v in value)
        except TypeError:
            raise TypeError(
                f"normalized_shape must be an int or a sequence of ints, got {value!r}"
            ) from None
    if not shape:
        raise ValueError("normalized_shape must have at least one dimension")
    if any(d < 0 for d in shape):
        raise ValueError(f"normalized_shape must not be negative, got {list(shape)}")
    return shape


def real_scalar(value, name):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    return v


def feature_axis(axis, ndim):
    try:
        return np.lib.array_utils.normalize_axis_index(operator.index(axis), ndim)
    except TypeError:
        raise TypeError(f"axis must be an int, got {axis!r}") from None


def row_mask(mask, lengths, batch_shape, op):
    """The one validator of padding masks: a contiguous bool array, one element per row of the
    batch dims (True = real token), from ``mask`` or from ``lengths``."""
    if mask is not None and lengths is not None:
        raise ValueError(f"{op}: give mask or lengths, not both")
    if lengths is not None:
        if len(batch_shape) != 2:
            raise ValueError(f"{op}: lengths= needs input of shape (N, T, ...) with batch dims "
                             f"(N, T), got batch dims {batch_shape}")
        N, T = batch_shape
        lens = as_array(lengths, "lengths")
        if lens.dtype.kind not in "iu":
            raise TypeError(f"lengths must be an integer array, got dtype {lens.dtype}")
        if lens.shape != (N,):
            raise ValueError(f"lengths must have shape ({N},), got {lens.shape}")
        if lens.size and (lens.min() < 0 or lens.max() > T):
            raise ValueError(f"lengths must lie in [0, {T}], got values from {lens.min()} to "
                             f"{lens.max()}")
        return (np.arange(T) < lens[:, None]).reshape(-1)
    m = as_array(mask, "mask")
    if m.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array (True = real token), got dtype {m.dtype}")
    if m.shape != tuple(batch_shape):
        raise ValueError(f"mask must have the input's batch shape {tuple(batch_shape)}, got "
                         f"{m.shape}")
    return np.ascontiguousarray(m).reshape(-1)


def saved(value, name, n):
    """Saved statistics: float64, contiguous, n elements (the shape is free: the kernels read
    n contiguous values; read only)."""
    if value is None:
        raise ValueError(f"{name} is required (the statistics saved by the forward pass)")
    if plain_size(value, _F64, n):
        return value
    arr = np.ascontiguousarray(as_array(value, name), dtype=np.float64)
    if arr.size != n:
        raise ValueError(f"{name} must have {n} elements (one per row or feature), got {arr.size}")
    return arr
