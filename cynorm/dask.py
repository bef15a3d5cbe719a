"""Dask interface: moments, batch_norm, layer_norm, rms_norm, group_norm and instance_norm of
dask arrays (needs dask[array]).

``import cynorm`` does not import this module; ``import cynorm.dask`` needs dask
(``pip install cynorm[dask]``; add ``distributed`` for a cluster).

Each chunk is reduced by cynorm's kernel into per-feature moments, and the partial moments are
merged by Chan's formula up the reduction tree, so the statistics equal those of the array in
memory to rounding, whatever the chunking.  Every task runs cynorm's kernels on one thread:
Dask already runs one task per core (and its distributed workers set OMP_NUM_THREADS=1).
"""
import math

import dask.array as da
import numpy as np

from . import _threads
from ._moments import RECORD, Moments, _reduce_axes, merge_arrays, moments as _np_moments
from ._validation import dtypes, normalized_shape as _normalized_shape, real_scalar
from ._batch_norm import _batch_norm_with_stats, check_training_eps
from ._group_norm import group_norm as _np_group_norm
from ._instance_norm import instance_norm as _np_instance_norm
from ._layer_norm import layer_norm as _np_layer_norm
from ._rms_norm import rms_norm as _np_rms_norm

__all__ = ["moments", "moments_records", "batch_norm", "layer_norm", "rms_norm", "group_norm",
           "instance_norm"]


def _as_dask(x):
    if isinstance(x, da.Array):
        return x
    return da.asarray(x)


def _chunk_moments(x, axis, keepdims, computing_meta=False):
    if computing_meta:
        return np.empty((0,) * x.ndim, dtype=RECORD)
    with _threads.num_threads(1):
        rec = _np_moments(x, axis)._records()
    return np.expand_dims(rec, axis)


def _merge_records(rec, axis, keepdims, computing_meta=False):
    """Chan's merge of the partial moments laid along ``axis`` (one record per block)."""
    if computing_meta:
        return np.empty((0,) * (rec.ndim if keepdims else rec.ndim - len(axis)), dtype=RECORD)
    keep = [i for i in range(rec.ndim) if i not in axis]
    parts = np.transpose(rec, list(axis) + keep)
    parts = parts.reshape((-1,) + parts.shape[len(axis):])
    n, hi, lo, m2 = (np.array(parts[0][f]) for f in ("count", "mean", "mean_lo", "m2"))
    for p in parts[1:]:
        n, hi, lo, m2 = merge_arrays(n, hi, lo, m2, p["count"], p["mean"], p["mean_lo"],
                                     p["m2"])
    out = np.empty(n.shape, dtype=RECORD)
    out["count"], out["mean"], out["mean_lo"], out["m2"] = n, hi, lo, m2
    return np.expand_dims(out, axis) if keepdims else out


def moments_records(x, axis=0, *, split_every=None):
    """The lazy form of ``moments``: a dask array of per-feature records (fields count, mean,
    mean_lo, m2), shape ``x.shape`` without ``axis``, chunked as x along the kept axes."""
    x = _as_dask(x)
    dtypes(x.dtype, "dask.moments")
    red = _reduce_axes(axis, x.ndim)
    out_ndim = x.ndim - len(red)
    return da.reduction(x, _chunk_moments, _merge_records, axis=red, keepdims=False,
                        dtype=RECORD, split_every=split_every, combine=_merge_records,
                        concatenate=True, name="cynorm-moments",
                        meta=np.empty((0,) * out_ndim, dtype=RECORD))


def moments(x, axis=0, *, split_every=None, **compute_kwargs):
    """Per-feature ``cynorm.Moments`` of a dask array over ``axis`` (as ``cynorm.moments``),
    computed now through ``dask.array.reduction`` (extra keywords go to ``compute``)."""
    return Moments._from_records(moments_records(x, axis, split_every=split_every)
                                 .compute(**compute_kwargs))


def _broadcast_params(values, axis, ndim, chunks):
    """(C,) arrays (or None) as dask arrays of shape (1, .., C, .., 1) chunked like x's
    feature axis, so that map_blocks hands each block its slice."""
    index = (None,) * axis + (slice(None),) + (None,) * (ndim - axis - 1)
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, da.Array):
            v = da.from_array(np.asarray(v), chunks=(chunks,))
        elif v.chunks[0] != chunks:
            v = v.rechunk((chunks,))
        out.append(v[index])
    return out


def _batch_norm_block(x, mean, mean_lo, var, weight, bias, eps, axis):
    stats = np.stack([mean.reshape(-1), mean_lo.reshape(-1), var.reshape(-1)])
    with _threads.num_threads(1):
        return _batch_norm_with_stats(x, stats, None if weight is None else weight.reshape(-1),
                                      None if bias is None else bias.reshape(-1), eps, axis)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               eps=1e-5, *, axis=1, split_every=None):
    """Lazy BatchNorm of a dask array, with ``cynorm.batch_norm``'s semantics.

    training=True normalizes with the statistics of the whole array (its exact moments, one
    reduction); otherwise with ``running_mean`` / ``running_var``.  Running statistics are not
    updated here (there is nothing to update in place in a lazy graph): fit them with
    ``cynorm.dask.moments`` or ``BatchNorm.partial_fit``.  Any chunking works.
    """
    x = _as_dask(x)
    rdt = dtypes(x.dtype, "dask.batch_norm")[1]
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects an input with at least 2 dims, got shape "
                         f"{x.shape}")
    ax = np.lib.array_utils.normalize_axis_index(axis, x.ndim)
    C = x.shape[ax]
    eps = real_scalar(eps, "eps")
    if training:
        check_training_eps(eps)
        if running_mean is not None or running_var is not None:
            raise ValueError("cynorm.dask.batch_norm does not update running statistics; fit "
                             "them with cynorm.dask.moments or BatchNorm.partial_fit")
        if math.prod(x.shape) // max(C, 1) < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {x.shape}")
        rec = moments_records(x, tuple(i for i in range(x.ndim) if i != ax),
                              split_every=split_every)
        mean, mean_lo = rec["mean"], rec["mean_lo"]
        var = rec["m2"] / rec["count"]
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given when not training")
        mean, var = running_mean, running_var
        mean_lo = np.zeros(C)
    for v, name in ((mean, "running_mean"), (var, "running_var"), (weight, "weight"),
                    (bias, "bias")):
        if v is not None and tuple(np.shape(v)) != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(np.shape(v))}")
    params = _broadcast_params((mean, mean_lo, var, weight, bias), ax, x.ndim, x.chunks[ax])
    return da.map_blocks(_batch_norm_block, x, *params, eps=eps, axis=ax, dtype=rdt,
                         meta=np.empty((0,) * x.ndim, dtype=rdt))


def _row_norm_block(x, fn, normalized_shape, params, eps):
    with _threads.num_threads(1):
        return fn(x, normalized_shape, *params, eps)


def _row_norm(fn, op, x, normalized_shape, params, eps):
    """A row norm (fn: cynorm.layer_norm or rms_norm) over blocks holding whole rows."""
    x = _as_dask(x)
    rdt = dtypes(x.dtype, op)[1]
    shape = _normalized_shape(normalized_shape)
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"Given normalized_shape={list(shape)}, expected input with shape "
                         f"[*, {', '.join(map(str, shape))}], but got input of size {x.shape}")
    params = tuple(None if v is None else np.asarray(v) for v in params)
    for v, name in zip(params, ("weight", "bias")):
        if v is not None and v.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {v.shape}")
    split = {i: -1 for i in range(x.ndim - k, x.ndim) if len(x.chunks[i]) > 1}
    if split:
        x = x.rechunk(split)
    return da.map_blocks(_row_norm_block, x, fn, shape, params, eps, dtype=rdt,
                         meta=np.empty((0,) * x.ndim, dtype=rdt))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Lazy LayerNorm of a dask array over its trailing ``normalized_shape`` dims.

    Each sample must lie in one chunk: the normalized dims are rechunked to one chunk each
    when they are split (the batch dims keep their chunks).
    """
    return _row_norm(_np_layer_norm, "dask.layer_norm", x, normalized_shape, (weight, bias),
                     real_scalar(eps, "eps"))


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """Lazy RMSNorm of a dask array over its trailing ``normalized_shape`` dims (as
    ``cynorm.rms_norm``; eps None: the compute dtype's machine epsilon), rechunked as
    layer_norm is."""
    return _row_norm(_np_rms_norm, "dask.rms_norm", x, normalized_shape, (weight,),
                     None if eps is None else real_scalar(eps, "eps"))


def _sample_block(x, fn, args, kwargs):
    with _threads.num_threads(1):
        return fn(x, *args, **kwargs)


def _per_sample(fn, op, x, args, kwargs):
    """A per-sample norm (group_norm, instance_norm) over blocks holding whole samples: every
    axis but the batch axis is rechunked to one chunk when it is split."""
    x = _as_dask(x)
    rdt = dtypes(x.dtype, op)[1]
    if x.ndim < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received "
                           f"{x.ndim}")
    split = {i: -1 for i in range(1, x.ndim) if len(x.chunks[i]) > 1}
    if split:
        x = x.rechunk(split)
    # checked now, on an empty batch of the same sample shape: errors raise here, not at compute
    fn(np.zeros((0,) + x.shape[1:], dtype=rdt), *args, **kwargs)
    return da.map_blocks(_sample_block, x, fn, args, kwargs, dtype=rdt,
                         meta=np.empty((0,) * x.ndim, dtype=rdt))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
    """Lazy GroupNorm of a dask array (as ``cynorm.group_norm``; ``axis=-1`` for
    channels-last).  Each sample's channels and spatial dims must lie in one chunk: they are
    rechunked so when split (the batch axis keeps its chunks)."""
    params = tuple(None if v is None else np.asarray(v) for v in (weight, bias))
    return _per_sample(_np_group_norm, "dask.group_norm", x, (num_groups,) + params,
                       {"eps": real_scalar(eps, "eps"), "axis": axis})


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, eps=1e-5, *, axis=1):
    """Lazy InstanceNorm of a dask array (as ``cynorm.instance_norm``), rechunked as
    group_norm is.  The running statistics only normalize (``use_input_stats=False``): there
    is nothing to update in place in a lazy graph."""
    if use_input_stats and (running_mean is not None or running_var is not None):
        raise ValueError("cynorm.dask.instance_norm does not update running statistics; give "
                         "them with use_input_stats=False to normalize with them")
    params = tuple(None if v is None else np.asarray(v)
                   for v in (running_mean, running_var, weight, bias))
    return _per_sample(_np_instance_norm, "dask.instance_norm", x,
                       params + (bool(use_input_stats),),
                       {"eps": real_scalar(eps, "eps"), "axis": axis})
