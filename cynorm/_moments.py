"""Mergeable per-feature moments: ``Moments`` and ``moments(x, axis)``.

A ``Moments`` holds, per feature, the count, the mean and M2 (the sum of squared deviations
from the mean) in float64.  Two of them merge exactly by Chan's formula, so statistics can be
gathered over data that never sits in memory at once (chunks of a memmap, batches of a stream,
blocks of a Dask array) and still equal those of the concatenated data to rounding.

The mean is kept as ``mean + mean_lo``: the float64 mean and the remainder it rounded away.
The merge's correction term needs the difference of two means; taken from rounded means it
is off by the rounding of the means themselves (1e-10 of a unit variance at an offset of 1e6),
taken from the two-term means it stays at the rounding of the data.
"""
import math
import operator

import numpy as np

from ._threads import threads_for
from ._validation import as_array, dtypes, half_kind, is_real, to_compute
from ._batch_norm import BATCH_NORM_SERIAL_BELOW, _feature_moments, _layout, _rescaled
from ._outputs import _rows_of

__all__ = ["Moments", "moments"]

_FIELDS = ("count", "mean", "mean_lo", "m2")
# One record per feature: how a Dask reduction carries Moments between its tasks.
RECORD = np.dtype([(name, np.float64) for name in _FIELDS])


def _float64_field(value, name, shape=None):
    arr = as_array(value, name)
    if not is_real(arr.dtype):
        raise TypeError(f"Moments: {name} must be a real numeric array, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float64, copy=True)
    if shape is not None and arr.shape != shape:
        raise ValueError(f"Moments: {name} must have the shape of count, {shape}, got "
                         f"{arr.shape}")
    return arr


class Moments:
    """Count, mean and M2 per feature (float64), mergeable by Chan's formula.

    Parameters
    ----------
    count, mean, m2 : array_like, one shape (the feature shape)
        Observations, their mean and the sum of their squared deviations from it.
    mean_lo : array_like, optional
        What the float64 ``mean`` rounded away (see the module notes); 0 by default.

    ``a.merge(b)`` (or ``a + b``) gives the moments of both parts; ``Moments.zeros(shape)``
    is the empty accumulator.  ``mean`` is NaN where the count is 0, ``var(correction)`` NaN
    where the count is at most ``correction``.  ``to_dict`` / ``from_dict`` and ``save`` /
    ``load`` (an .npz, read without unpickling) keep the state.
    """

    __slots__ = ("count", "_mean", "_mean_lo", "m2")

    def __init__(self, count, mean, m2, mean_lo=None):
        count = _float64_field(count, "count")
        shape = count.shape
        mean = _float64_field(mean, "mean", shape)
        m2 = _float64_field(m2, "m2", shape)
        mean_lo = np.zeros(shape) if mean_lo is None else _float64_field(mean_lo, "mean_lo",
                                                                         shape)
        if np.any(~(count >= 0)) or np.any(count != np.floor(count)):
            raise ValueError("Moments: count must hold non-negative whole numbers")
        if np.any(m2 < 0):
            raise ValueError("Moments: m2 (a sum of squares) must not be negative")
        empty = count == 0
        if empty.any():  # the empty part carries nothing, whatever was written there
            mean[empty] = 0.0
            mean_lo[empty] = 0.0
            m2[empty] = 0.0
        self.count = count
        self._mean = mean
        self._mean_lo = mean_lo
        self.m2 = m2

    @classmethod
    def _trusted(cls, count, mean, mean_lo, m2):
        self = cls.__new__(cls)
        self.count, self._mean, self._mean_lo, self.m2 = count, mean, mean_lo, m2
        return self

    @classmethod
    def zeros(cls, shape):
        """The empty accumulator for features of ``shape`` (merging with it changes nothing)."""
        shape = (operator.index(shape),) if np.ndim(shape) == 0 else tuple(
            operator.index(d) for d in shape)
        z = np.zeros(shape)
        return cls._trusted(z, z.copy(), z.copy(), z.copy())

    @property
    def shape(self):
        """The feature shape."""
        return self.count.shape

    @property
    def mean(self):
        """The mean per feature (NaN where nothing was counted)."""
        m = self._mean + self._mean_lo
        return m if np.all(self.count > 0) else np.where(self.count > 0, m, np.nan)

    def var(self, correction=0):
        """``m2 / (count - correction)``: correction=0 the biased variance (what BatchNorm
        normalizes with), 1 the unbiased one (what it keeps as running_var)."""
        if isinstance(correction, bool) or not isinstance(correction, (int, float, np.integer,
                                                                       np.floating)):
            raise TypeError(f"correction must be a number, got {correction!r}")
        d = self.count - correction
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, self.m2 / np.where(d > 0, d, 1.0), np.nan)

    def std(self, correction=0):
        return np.sqrt(self.var(correction))

    def merge(self, other):
        """The moments of both parts together (Chan's parallel formula)."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge Moments of feature shape {self.shape} with "
                             f"{other.shape}")
        return Moments._trusted(*merge_arrays(self.count, self._mean, self._mean_lo, self.m2,
                                              other.count, other._mean, other._mean_lo,
                                              other.m2))

    def __add__(self, other):
        if not isinstance(other, Moments):
            return NotImplemented
        return self.merge(other)

    def to_dict(self):
        """Copies of the state: ``count``, ``mean``, ``mean_lo`` and ``m2`` (float64 arrays)."""
        return {"count": self.count.copy(), "mean": self._mean.copy(),
                "mean_lo": self._mean_lo.copy(), "m2": self.m2.copy()}

    @classmethod
    def from_dict(cls, state):
        """From a mapping with ``count``, ``mean``, ``m2`` (and optionally ``mean_lo``), e.g.
        what ``to_dict`` returned or an opened .npz; every value is checked and copied."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        keys = set(state.keys())
        missing = {"count", "mean", "m2"} - keys
        unexpected = keys - set(_FIELDS)
        if missing or unexpected:
            raise KeyError(f"Moments state: missing keys {sorted(missing)}, unexpected keys "
                           f"{sorted(unexpected)}")
        return cls(state["count"], state["mean"], state["m2"], state.get("mean_lo"))

    def save(self, file):
        """Write the state to an .npz (``np.savez``); ``Moments.load`` reads it back."""
        np.savez(file, **self.to_dict())

    @classmethod
    def load(cls, file):
        """Read what ``save`` wrote; object arrays are refused (the file is never unpickled)."""
        with np.load(file, allow_pickle=False) as data:
            return cls.from_dict({k: data[k] for k in data.files})

    def _records(self):
        rec = np.empty(self.shape, dtype=RECORD)
        rec["count"], rec["mean"], rec["mean_lo"], rec["m2"] = (
            self.count, self._mean, self._mean_lo, self.m2)
        return rec

    @classmethod
    def _from_records(cls, rec):
        return cls._trusted(*(np.array(rec[name], dtype=np.float64) for name in _FIELDS))

    def __repr__(self):
        n = self.count.reshape(-1)
        counts = "" if n.size == 0 else (
            f", count={n[0]:.17g}" if np.all(n == n[0]) else ", count varies")
        return f"Moments(shape={self.shape}{counts})"


def merge_arrays(na, ha, la, ma, nb, hb, lb, mb):
    """Chan's merge of (count, mean hi, mean lo, m2) arrays, elementwise; new arrays."""
    n = na + nb
    with np.errstate(divide="ignore", invalid="ignore"):
        wb = np.where(n > 0, nb / np.where(n > 0, n, 1.0), 0.0)
    delta = (hb - ha) + (lb - la)
    step = delta * wb
    # hi + step as a two-term sum, so the mean keeps what the addition rounds away
    hi = ha + step
    virtual = hi - ha
    lo = la + ((ha - (hi - virtual)) + (step - virtual))
    m2 = ma + mb + delta * delta * (na * wb)
    # an empty side contributes nothing: take the other side as it is (no 0 * inf, no NaN)
    a_empty, b_empty = na == 0, nb == 0
    if a_empty.any() or b_empty.any():
        hi = np.where(a_empty, hb, np.where(b_empty, ha, hi))
        lo = np.where(a_empty, lb, np.where(b_empty, la, lo))
        m2 = np.where(a_empty, mb, np.where(b_empty, ma, m2))
    # renormalize: hi carries the magnitude, lo the remainder
    top = hi + lo
    lo = lo - (top - hi)
    return n, top, lo, m2


def _reduce_axes(axis, ndim):
    """The reduced axes, sorted, from None / an int / a sequence of ints (NumPy's rules)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        axes = axis
    else:
        axes = (axis,)
    try:
        out = [np.lib.array_utils.normalize_axis_index(operator.index(a), ndim) for a in axes]
    except TypeError:
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate value in axis: {axis!r}")
    return tuple(sorted(out))


def moments(x, axis=0, *, mask=None):
    """Per-feature ``Moments`` of x over ``axis``, computed by cynorm's kernels.

    Parameters
    ----------
    x : array_like
        Any real dtype (the dtype policy of the other functions; statistics in float64).
    axis : None, int or tuple of ints
        The axes reduced over, as in ``np.var``: the others are the features.  ``axis=0`` for
        (N, C) data; ``axis=(0, 2, 3)`` for BatchNorm2d's (N, C, H, W); ``axis=(0, 1)`` for
        feature-last (N, T, C).
    mask : bool array, optional
        One element per position of the reduced axes (shape ``x.shape`` at ``axis``): only
        positions marked True are counted (e.g. the real tokens of a padded batch).

    Returns
    -------
    Moments
        With feature shape ``x.shape`` without ``axis``.
    """
    x = as_array(x)
    cdt, _ = dtypes(x.dtype, "moments")
    red = _reduce_axes(axis, x.ndim)
    keep = [i for i in range(x.ndim) if i not in red]
    fshape = tuple(x.shape[i] for i in keep)
    row_mask = None
    if mask is not None:
        m = as_array(mask, "mask")
        if m.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array (True = counted), got dtype {m.dtype}")
        rshape = tuple(x.shape[i] for i in red)
        if m.shape != rshape:
            raise ValueError(f"mask must have the shape of x at the reduced axes {red}, "
                             f"{rshape}, got {m.shape}")
        row_mask = np.ascontiguousarray(m).reshape(-1)
    if x.size and half_kind(x.dtype) < 0:   # 16-bit x is read (and widened) by the kernels
        x = to_compute(x, cdt)
    return _moments(x, red, keep, fshape, row_mask)


def _moments(x, red, keep, fshape, row_mask=None):
    C = math.prod(fshape)
    R = math.prod(x.shape[i] for i in red)
    if C == 0 or R == 0 or (row_mask is not None and not row_mask.any()):
        return Moments.zeros(fshape)
    if row_mask is None and keep == list(range(keep[0], keep[-1] + 1) if keep else []):
        # the features are one run of axes: x is (A, C, L) as it lies
        k0 = keep[0] if keep else 0
        A = math.prod(x.shape[:k0])
        L = R // A
    else:
        # reduced axes first, features last: (R, C) with a row per counted position
        x = np.transpose(x, list(red) + keep)
        A, L = R, 1
    rows, cols, by_rows = _layout(A, C, L)
    x = _rows_of(x, rows, cols)
    n_threads = threads_for(x.size, BATCH_NORM_SERIAL_BELOW)
    half = half_kind(x.dtype)
    n, stats = _feature_moments(x, rows, cols, C, by_rows, n_threads, row_mask, half=half)
    if n < 0:  # an M2 beyond float64: the mean from scaled data, the M2 inf (not NaN)
        n = -n
        if half >= 0:   # the rescue works on a float32 copy of 16-bit x
            x = to_compute(x, np.dtype(np.float32))
        _rescaled(x, A, C, L, rows, cols, by_rows, n_threads, row_mask, stats)
    count = np.full(fshape, float(n))
    return Moments._trusted(count, stats[0].reshape(fshape), stats[1].reshape(fshape),
                            stats[2].reshape(fshape))
