"""The group norms' front end, shared by GroupNorm and InstanceNorm (one channel per group):
the one validator of their input, the mask, the forward and backward calls.  The public
functions and layers are in _group_norm.py and _instance_norm.py; the kernels in
pyx/ops/group_norm.pxi."""
import math

import numpy as np

from ._isa import kernels as _kernels
from ._outputs import (_backward_results, _finish, _output, _overlaps_any, backward_kind,
                       backward_outputs)
from ._threads import threads_for
from ._validation import (
    as_array,
    cast,
    check_out,
    dtypes,
    empty,
    feature_axis,
    half_kind,
    is_real,
    param,
    real_scalar,
    row_mask as _row_mask,
    to_compute,
)


class GroupInput:
    """x as the kernels read it, with its layout: (N, C, S) channels-first or (N, S, C)
    channels-last, C-contiguous, in the compute dtype (x), and for 16-bit input (half: its
    kind, else -1) also in its own dtype (x16; x is then made on first use)."""

    __slots__ = ("_x", "x16", "half", "cdt", "rdt", "shape", "N", "C", "S", "last")

    def __init__(self, x, op, axis):
        if type(x) is not np.ndarray:
            x = as_array(x)
        if x.ndim < 2:
            raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received "
                               f"{x.ndim}")
        self.cdt, self.rdt = dtypes(x.dtype, op)
        ax = feature_axis(axis, x.ndim)
        if ax not in (1, x.ndim - 1):
            raise ValueError(f"{op}: axis must name the channel axis, 1 (channels-first) or -1 "
                             f"(channels-last), got {axis} for input of {x.ndim} dims")
        self.shape = x.shape
        self.N = x.shape[0]
        self.C = x.shape[ax]
        self.S = math.prod(x.shape[1:]) // self.C if self.C else 0
        self.last = ax == x.ndim - 1 and x.ndim > 2
        self.half = half_kind(x.dtype)
        if self.half >= 0:
            self.x16, self._x = np.ascontiguousarray(x), None
        else:
            self.x16, self._x = None, np.ascontiguousarray(to_compute(x, self.cdt))

    @property
    def x(self):
        """x in the compute dtype (for 16-bit input a float32 copy, made on first use)."""
        if self._x is None:
            self._x = np.ascontiguousarray(to_compute(self.x16, self.cdt))
        return self._x

    @property
    def size(self):
        return math.prod(self.shape)

    def channel_param(self, value, name, op):
        """weight / bias: (C,) in the compute dtype, torch's error for another size."""
        if value is None:
            return None
        arr = as_array(value, name)
        if arr.size != self.C or arr.ndim != 1:
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in "
                f"input, but got {name} of shape {list(arr.shape)} and input of shape "
                f"{list(self.shape)}")
        return param(arr, name, (self.C,), self.cdt)

    def mask(self, mask, lengths, op):
        """The (N, S) bool mask of real positions, or None; only for (N, C, L) / (N, L, C)."""
        if mask is None and lengths is None:
            return None
        if len(self.shape) != 3:
            raise ValueError(f"{op}: mask= and lengths= take input of shape (N, C, L), or "
                             f"(N, L, C) with axis=-1; got shape {self.shape}")
        return _row_mask(mask, lengths, (self.N, self.S), op)

    def like(self, value, name, dt=None):
        """An array of x's shape (grad_out) as the kernels read it: C-contiguous, in dt (None:
        the compute dtype)."""
        a = as_array(value, name)
        if a.shape != self.shape:
            raise ValueError(f"{name} must have the shape of x, {self.shape}, got {a.shape}")
        if not is_real(a.dtype):
            raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
        return np.ascontiguousarray(to_compute(a, dt or self.cdt))


def check_groups(inp, num_groups):
    """torch's check of num_groups against the input's channels (RuntimeError, as F.group_norm)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    G = int(num_groups)
    if G < 1 or inp.C % G:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(inp.shape)} and num_groups={G}")
    return G


def forward(inp, G, w, b, eps, out, row_mask, given=None):
    """(y, moments, mean, rstd): the moments (6, N·G) are count, mean hi, mean lo, M2, mean
    and rstd; mean and rstd are also returned as (N, G) views.  given: the moments (6, N·G),
    read instead of computed (InstanceNorm with running statistics)."""
    eps = eps if type(eps) is float else real_scalar(eps, "eps")
    if out is not None:
        check_out(out, inp.shape, inp.rdt)
    N = inp.N
    stats = given if given is not None else np.empty((6, N * G))
    if inp.size == 0:
        stats[1:] = np.nan
        stats[0] = 0.0
        return ((np.empty(inp.shape, inp.rdt) if out is None else out), stats,
                stats[4].reshape(N, G), stats[5].reshape(N, G))
    if inp.half >= 0:
        y = _forward_half(inp, G, w, b, eps, out, stats, given is not None, row_mask)
        return y, stats, stats[4].reshape(N, G), stats[5].reshape(N, G)
    x = inp.x
    y = None
    if (out is not None and inp.rdt is inp.cdt and out.flags.c_contiguous
            and not _overlaps_any(out, (w, b, row_mask))
            and (out is x or not np.may_share_memory(out, x))):
        y = out
    target = y if y is not None else empty(inp.shape, inp.cdt, x)
    bad = _kernels.group_norm(x, target, N, inp.C, inp.S, G, inp.last, w, b, eps, stats,
                              given is not None, row_mask, True, threads_for(x.size))
    mean, rstd = stats[4].reshape(N, G), stats[5].reshape(N, G)
    if bad and given is None:
        for n, k in _scaled(inp, rstd):
            _rescue_forward(inp, n, k, G, w, b, eps, row_mask, target, mean, rstd)
    if y is None and out is None:
        y = target if inp.rdt is inp.cdt else cast(target, inp.rdt)
    elif y is None:
        out[...] = target
        y = out
    return y, stats, mean, rstd


def _forward_half(inp, G, w, b, eps, out, stats, given, row_mask):
    """forward on 16-bit x, read and written by the kernels in its own dtype (group_norm_half:
    the moments of its rows widened to float32, then BatchNorm's 16-bit affine with the
    groups' parameters).  stats (6, N·G) as forward's."""
    x, shape, rdt = inp.x16, inp.shape, inp.rdt
    rows, cols = (inp.N * inp.S, inp.C) if inp.last else (inp.N * inp.C, inp.S)
    y, result, write_padding = _output(x, shape, rows, cols, rdt, rdt, out, (row_mask,),
                                       row_mask is not None)
    if not y.flags.c_contiguous:   # an out= with gaps: written through a fresh array
        y, result, write_padding = empty(shape, rdt, x), None, True
    _kernels.group_norm_half(x, y, inp.N, inp.C, inp.S, G, inp.last, w, b, eps, stats, given,
                             row_mask, write_padding, inp.half, threads_for(x.size))
    return _finish(y, result, shape, rdt, out)


def _scaled(inp, rstd):
    """(sample, k) for the samples to redo as x·2^-k: an rstd out of the range in which the
    kernels' coefficients (rstd·w; rstd³ in backward) stay exact in the compute dtype, or NaN
    (squares that overflowed), on finite data; k the exponent of the largest magnitude."""
    top = _kernels.RSTD_MAX[inp.cdt.name]
    with np.errstate(invalid="ignore"):
        bad = (~((rstd >= 1.0 / top) & (rstd <= top))).any(axis=1)
    for n in np.flatnonzero(bad):
        xn = inp.x[n]
        if np.isfinite(xn).all() and xn.any():
            yield int(n), int(np.frexp(np.abs(xn).max())[1])


def _one(inp, n, k, row_mask):
    """Sample n scaled by 2^-k as a (1, ...) array, with its mask row."""
    xs = np.ldexp(inp.x[n:n + 1], -k).astype(inp.cdt)
    m = None if row_mask is None else np.ascontiguousarray(row_mask.reshape(inp.N, -1)[n])
    return xs, m


def _rescue_forward(inp, n, k, G, w, b, eps, row_mask, target, mean, rstd):
    """Sample n again on x·2^-k with eps·2^-2k: the same y, exactly scaled statistics."""
    eps_s = float(np.ldexp(eps, -2 * k))
    if not np.isfinite(eps_s):  # eps dominates: nothing to rescue
        return
    xs, m = _one(inp, n, k, row_mask)
    st = np.empty((6, G))
    ys = np.empty_like(xs)
    _kernels.group_norm(xs, ys, 1, inp.C, inp.S, G, inp.last, w, b, eps_s, st, False, m, True,
                        1)
    target[n] = ys[0]
    mean[n] = np.ldexp(st[4], k)
    rstd[n] = np.ldexp(st[5], -k)


def saved_stats(inp, G, value, name):
    """Saved per-(sample, group) statistics as float64 (N·G,): (N, G), or (G,) for all samples."""
    if value is None:
        raise ValueError(f"{name} is required (the statistics saved by the forward pass)")
    arr = np.asarray(as_array(value, name), dtype=np.float64)
    n = inp.N * G
    if arr.size == n:
        return arr.reshape(n)
    if arr.size == G:
        return np.broadcast_to(arr.reshape(1, G), (inp.N, G)).reshape(n)
    raise ValueError(f"{name} must have {n} elements (one per sample and group), got {arr.size}")


def backward_call(op, num_groups, grad_out, x, mean, rstd, weight, bias, axis, mask, lengths,
                  fixed):
    """group_norm_backward, or instance_norm_backward (num_groups None: one channel a group):
    the arguments checked, then backward."""
    inp = GroupInput(x, op, axis)
    G = inp.C if num_groups is None else check_groups(inp, num_groups)
    w = inp.channel_param(weight, "weight", op)
    if bias is not None:
        inp.channel_param(bias, "bias", op)
    row_mask = inp.mask(mask, lengths, op)
    mean = saved_stats(inp, G, mean, "mean")
    rstd = saved_stats(inp, G, rstd, "rstd")
    dx, dw, db = backward(inp, G, grad_out, mean, rstd, w, w is not None, bias is not None,
                          row_mask, fixed)
    return _backward_results(inp.rdt, inp.cdt, dx, dw, weight, db, bias)


def backward(inp, G, grad_out, mean, rstd, w, want_w, want_b, row_mask, fixed):
    """(dx, dw, db) of a group norm over its saved mean and rstd (N·G each); 16-bit x and
    grad_out of its dtype are read by the kernels as they are, and dx written in that dtype."""
    half = -1 if inp.half < 0 else backward_kind(inp.rdt, grad_out)
    g = inp.like(grad_out, "grad_out", inp.rdt if half >= 0 else None)
    x = inp.x16 if half >= 0 else inp.x
    N, C, S = inp.N, inp.C, inp.S
    if row_mask is None:
        count = np.full(N * G, float(C // G * S))
    else:
        count = np.repeat(row_mask.reshape(N, S).sum(axis=1) * float(C // G), G)
    stats = np.stack([count, mean, rstd])
    sums = np.empty((N, 2, C))
    # dx: from the output cache
    dx, dw, db = backward_outputs(x, inp.cdt, inp.rdt, half, (C,), want_w, want_b)
    if x.size == 0:  # no kernel call: nothing was summed
        for a in (dw, db):
            if a is not None:
                a[...] = 0
    if x.size and _kernels.group_norm_backward(g, x, dx, N, C, S, G, inp.last, stats, w, fixed,
                                               sums, dw, db, row_mask, threads_for(x.size),
                                               half):
        _rescue_backward(inp, G, g, stats, w, fixed, row_mask, sums, dx, dw, db)
    return dx, dw, db   # dx in inp.cdt or 16-bit: backward_call gives them the result dtypes


def _rescue_backward(inp, G, g, stats, w, fixed, row_mask, sums, dx, dw, db):
    """The samples _scaled picks, again on x·2^-k, mean·2^-k and rstd·2^k (the same
    normalization, its coefficients in range): dx scales by 2^-k, and the sums Σg·(x - mean)
    go with the scaled rstd; then dw and db again from every sample's sums."""
    N, C, S = inp.N, inp.C, inp.S
    count, mean, rstd = (a.reshape(N, G) for a in stats)
    r_eff = rstd.copy()
    for n, k in _scaled(inp, rstd):
        xs, m = _one(inp, n, k, row_mask)
        st = np.stack([count[n], np.ldexp(mean[n], -k), np.ldexp(rstd[n], k)])
        dxs = np.empty_like(xs)
        sums_s = np.empty((1, 2, C))
        gs = np.ascontiguousarray(to_compute(g[n:n + 1], inp.cdt))   # (16-bit g: widened)
        _kernels.group_norm_backward(gs, xs, dxs, 1, C, S, G, inp.last, st, w, fixed, sums_s,
                                     None, None, m, 1)
        dx[n] = np.ldexp(dxs[0], -k)   # (16-bit dx: rounded once, to nearest even)
        sums[n] = sums_s[0]
        r_eff[n] = st[2]
    # a sample with no real position has rstd NaN and sums 0: it adds nothing
    r = np.repeat(np.where(count > 0, r_eff, 0.0), C // G, axis=1)
    if dw is not None:
        dw[...] = np.einsum("nc,nc->c", r, sums[:, 1])
    if db is not None:
        db[...] = sums[:, 0].sum(axis=0)
