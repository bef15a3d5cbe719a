"""Layer classes with torch.nn's semantics, holding NumPy parameters and buffers."""
import os
import threading

import numpy as np

from ._moments import _moments
from ._validation import (
    as_array,
    dtypes,
    feature_axis,
    normalized_shape as _normalized_shape,
    real_scalar,
    to_compute,
)
from .functional import (
    _feature_last_mask,
    _invstd,
    batch_norm,
    batch_norm_backward,
    layer_norm,
    layer_norm_backward,
)

__all__ = ["LayerNorm", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


def _layer_dtype(dtype):
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt


class _Module:
    """What LayerNorm and BatchNorm share: train/eval, alpha/beta, state_dict."""

    _state_names: tuple[str, ...] = ()  # keys of state_dict, in torch's order

    def __init__(self):
        self.training = True
        self._lock = threading.Lock()  # serializes training calls (running stats, saved input)
        self._saved = None
        self.grad_weight = None
        self.grad_bias = None

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def alpha(self):
        """The affine scale (new standard deviation): the same array as ``weight``."""
        return self.weight

    @alpha.setter
    def alpha(self, value):
        self.weight = value

    @property
    def beta(self):
        """The affine shift (new mean): the same array as ``bias``."""
        return self.bias

    @beta.setter
    def beta(self, value):
        self.bias = value

    def _state(self):
        return {k: getattr(self, k) for k in self._state_names if getattr(self, k) is not None}

    def state_dict(self):
        """Copies of the parameters and buffers under torch's key names."""
        return {k: np.array(v, copy=True) for k, v in self._state().items()}

    def save_state_dict(self, file):
        """Write ``state_dict()`` to an .npz (``np.savez``); ``load_state_dict(file)`` reads it."""
        np.savez(file, **self.state_dict())

    def load_state_dict(self, state_dict, strict=True):
        """Load arrays under torch's key names (e.g. ``{k: v.numpy() for k, v in sd.items()}``),
        or an .npz file (a path), read with ``allow_pickle=False``: nothing is ever unpickled.

        Every key is checked before anything is written: on any error the layer is unchanged.
        With ``strict=False`` missing and unexpected keys are ignored (shapes are still checked).
        Values must be real numeric arrays (integers for ``num_batches_tracked``).
        """
        if isinstance(state_dict, (str, bytes, os.PathLike)):
            with np.load(state_dict, allow_pickle=False) as data:
                try:
                    arrays = {k: data[k] for k in data.files}
                except ValueError as exc:  # an object array: it would need unpickling
                    raise ValueError(f"{os.fsdecode(state_dict)}: {exc}") from None
            return self.load_state_dict(arrays, strict)
        if not hasattr(state_dict, "items"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        own = self._state()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        staged = {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            if isinstance(value, np.ndarray) and value.dtype.kind == "O":
                raise TypeError(f"{key}: object arrays are not accepted")
            try:
                arr = np.asarray(value)
            except Exception as exc:
                raise TypeError(f"{key}: not an array: {exc}") from None
            if arr.shape != target.shape:
                raise ValueError(
                    f"size mismatch for {key}: copying a param with shape {arr.shape}, "
                    f"the shape in current model is {target.shape}"
                )
            allowed = "iu" if target.dtype.kind in "iu" else "iuf"
            if arr.dtype.kind not in allowed:
                raise TypeError(f"{key}: expected a {target.dtype} compatible array, got {arr.dtype}")
            staged[key] = arr
        for key, arr in staged.items():
            own[key][...] = arr
        return self

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    def _need_saved(self):
        """What the last forward saved for backward.  Every forward replaces it (a failed one
        clears it), so backward always differentiates the last forward, in its own mode."""
        saved = self._saved
        if saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() needs a forward pass first (call layer(x), "
                "then layer.backward(grad_out)); the last forward, if any, failed"
            )
        return saved

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_saved"] = None  # the input of the last forward is not part of the layer
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class LayerNorm(_Module):
    """Layer normalization over the trailing ``normalized_shape`` dims, as torch.nn.LayerNorm.

    ``weight`` (alias ``alpha``) starts at 1 and ``bias`` (alias ``beta``) at 0, both of shape
    ``normalized_shape`` and dtype ``dtype``.  Training and eval behave the same.
    """

    _state_names = ("weight", "bias")

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = real_scalar(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = _layer_dtype(dtype)
        if self.elementwise_affine:
            self.weight = np.ones(self.normalized_shape, dtype=self.dtype)
            self.bias = np.zeros(self.normalized_shape, dtype=self.dtype) if bias else None
        else:
            self.weight = None
            self.bias = None

    def forward(self, x, *, mask=None, lengths=None):
        """Normalize x (padding rows skipped and written as 0 with mask= or lengths=).  The
        input and its statistics are kept for backward, in both modes (they behave the same)."""
        self._saved = None
        if not self.training:  # inference: the statistics are recomputed if backward is called
            y = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                           mask=mask, lengths=lengths)
            self._saved = (x, None, None, mask, lengths, self.eps)
            return y
        y, mean, rstd = layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                   return_stats=True, mask=mask, lengths=lengths)
        self._saved = (x, mean, rstd, mask, lengths, self.eps)
        return y

    def backward(self, grad_out):
        """grad_input of the last forward; sets grad_weight and grad_bias (None for a missing
        parameter).  The input is kept by reference: do not modify it in between."""
        x, mean, rstd, mask, lengths, eps = self._need_saved()
        if mean is None:
            _, mean, rstd = layer_norm(x, self.normalized_shape, eps=eps, return_stats=True,
                                       mask=mask, lengths=lengths)
        dx, self.grad_weight, self.grad_bias = layer_norm_backward(
            grad_out, x, mean, rstd, self.normalized_shape, self.weight, self.bias, mask=mask,
            lengths=lengths)
        return dx

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")


class BatchNorm(_Module):
    """Batch normalization of the features on ``axis``, as torch.nn.BatchNorm*d.

    ``axis=1`` is torch's layout, (N, C) or (N, C, *spatial); ``axis=-1`` takes feature-last
    input such as (N, T, C).  In training the batch statistics normalize the input and update
    ``running_mean`` / ``running_var`` (unbiased) with ``momentum``, or with a cumulative
    average when ``momentum`` is None; in eval the running statistics normalize.  With
    ``track_running_stats=False`` there are no buffers and batch statistics are always used.
    Training calls on one layer from several threads are serialized by a lock.

    ``partial_fit(x)`` / ``fit(batches)`` gather exact statistics (count, mean, M2 per feature,
    as ``moments_``) over any number of batches instead of a moving average, and write them to
    the running statistics, which eval mode then uses.
    """

    _state_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    _ndims: tuple[int, ...] | None = None  # allowed input ndim, set by the 1d/2d/3d subclasses

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, *, bias=True):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = int(num_features)
        self.eps = real_scalar(eps, "eps")
        self.momentum = None if momentum is None else real_scalar(momentum, "momentum")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = _layer_dtype(dtype)
        C = self.num_features
        self.weight = np.ones(C, dtype=self.dtype) if self.affine else None
        self.bias = np.zeros(C, dtype=self.dtype) if self.affine and bias else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype=self.dtype)
            self.running_var = np.ones(C, dtype=self.dtype)
            self.num_batches_tracked = np.zeros((), dtype=np.int64)
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        self.moments_ = None

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _check_input_dim(self, x):
        if self._ndims is not None and x.ndim not in self._ndims:
            want = " or ".join(f"{d}D" for d in self._ndims)
            raise ValueError(f"expected {want} input (got {x.ndim}D input)")

    def _check_input(self, x):
        """x as an array with this layer's ndim and num_features on its axis (or the error);
        the feature axis, or None when batch_norm is to raise the axis error itself."""
        x = as_array(x)
        self._check_input_dim(x)
        ax = None
        if x.ndim >= 2:
            try:
                ax = feature_axis(self.axis, x.ndim)
            except np.exceptions.AxisError:
                ax = None  # batch_norm raises it, with the same message as for the function
            if ax is not None and x.shape[ax] != self.num_features:
                raise ValueError(
                    f"{type(self).__name__}({self.num_features}) expected {self.num_features} "
                    f"features on axis {self.axis}, got input of shape {x.shape}"
                )
        return x, ax

    def forward(self, x, *, mask=None, lengths=None):
        """Normalize x; with mask= or lengths= (feature-last (N, T, C) input, axis=-1) the
        statistics come from the real tokens only and padding positions are written as 0.

        The input and the statistics it was normalized with are kept for ``backward``: the
        batch's in training (and in eval without running statistics), the running ones in eval,
        which backward then treats as constants, as torch does for a frozen BatchNorm."""
        self._saved = None
        x, _ = self._check_input(x)
        if not self.training and self.running_mean is not None:
            y = batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                           False, 0.0, self.eps, axis=self.axis, mask=mask, lengths=lengths)
            # backward's constants: the running statistics as this forward used them
            frozen = (self.running_mean.copy(), self.running_var.copy(), self.eps)
            self._saved = (x, None, frozen, mask, lengths, False)
            return y
        if not self.training:  # no running statistics: the batch's, as in training
            y, mean, invstd = batch_norm(x, None, None, self.weight, self.bias, True, 0.0,
                                         self.eps, axis=self.axis, return_stats=True,
                                         mask=mask, lengths=lengths)
            self._saved = (x, mean, invstd, mask, lengths, True)
            return y
        with self._lock:
            if self.track_running_stats:
                tracked = int(self.num_batches_tracked) + 1
                momentum = 1.0 / tracked if self.momentum is None else self.momentum
            else:
                momentum = 0.0
            y, mean, invstd = batch_norm(x, self.running_mean, self.running_var, self.weight,
                                         self.bias, True, momentum, self.eps, axis=self.axis,
                                         return_stats=True, mask=mask, lengths=lengths)
            if self.track_running_stats:
                self.num_batches_tracked[...] = tracked
            self._saved = (x, mean, invstd, mask, lengths, True)
        return y

    def partial_fit(self, x, *, mask=None, lengths=None):
        """Add the batch x to the exact statistics in ``moments_`` and write them to
        ``running_mean`` and ``running_var`` (unbiased, as torch keeps it; left alone until two
        values per feature were seen).  Nothing is normalized and the mode is not changed:
        call ``eval()`` to normalize with the fitted statistics.  mask / lengths as in forward.
        """
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__}.partial_fit needs "
                             "track_running_stats=True (there are no running statistics)")
        x, ax = self._check_input(x)
        if ax is None:
            if x.ndim >= 2:
                feature_axis(self.axis, x.ndim)  # raises the AxisError
            raise ValueError(f"{type(self).__name__}.partial_fit expects an input with at least "
                             f"2 dims, got shape {x.shape}")
        cdt, _ = dtypes(x.dtype, "BatchNorm.partial_fit")
        red = tuple(i for i in range(x.ndim) if i != ax)
        row_mask = None
        if mask is not None or lengths is not None:
            L = 1 if ax == x.ndim - 1 else 0
            row_mask = _feature_last_mask(mask, lengths, x.shape, L, "BatchNorm.partial_fit")
        batch = _moments(to_compute(x, cdt) if x.size else x, red, [ax], (self.num_features,),
                         row_mask)
        with self._lock:
            total = batch if self.moments_ is None else self.moments_.merge(batch)
            count = float(total.count[0])
            if count >= 1:
                mean = total.mean
                var = total.var(1) if count >= 2 else None
                self.running_mean[...] = mean
                if var is not None:
                    self.running_var[...] = var
            self.moments_ = total
            self.num_batches_tracked[...] += 1
        return self

    def fit(self, data, *, mask=None, lengths=None):
        """Exact statistics of ``data`` (one array, or an iterable of batches such as a
        generator or a list of arrays), from scratch: ``moments_`` is reset, then
        ``partial_fit`` runs on each batch.  mask / lengths only with a single array."""
        single = isinstance(data, np.ndarray) or hasattr(data, "__array__") or (
            isinstance(data, (list, tuple))
            and not all(isinstance(b, np.ndarray) or hasattr(b, "__array__") for b in data))
        if not single and (mask is not None or lengths is not None):
            raise ValueError("fit: mask and lengths go with a single array; for batches call "
                             "partial_fit(batch, mask=...) on each")
        with self._lock:
            self.moments_ = None
            self.num_batches_tracked[...] = 0
        if single:
            return self.partial_fit(data, mask=mask, lengths=lengths)
        seen = False
        for batch in data:
            self.partial_fit(batch)
            seen = True
        if not seen:
            raise ValueError("fit: no batches")
        return self

    def backward(self, grad_out):
        """grad_input of the last forward, in the mode it ran in; sets grad_weight and
        grad_bias.  After a training forward the batch statistics depend on x; after an eval
        forward the running statistics are constants: ``dx = grad_out * weight * invstd``.
        The input is kept by reference: do not modify it in between."""
        x, mean, invstd, mask, lengths, batch_stats = self._need_saved()
        if mean is None:  # after an eval forward: the frozen running statistics
            running_mean, running_var, eps = invstd
            mean = running_mean.astype(np.float64)
            invstd = _invstd(running_var.astype(np.float64), eps)
        dx, self.grad_weight, self.grad_bias = batch_norm_backward(
            grad_out, x, mean, invstd, self.weight, batch_stats, axis=self.axis, bias=self.bias,
            mask=mask, lengths=lengths)
        return dx

    def __repr__(self):
        axis = "" if self._ndims is not None else f", axis={self.axis}"
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{axis})")


class _TorchLayoutBatchNorm(BatchNorm):
    """BatchNorm with the features on axis 1 and torch's check of the input's ndim."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, 1, dtype,
                         bias=bias)


class BatchNorm1d(_TorchLayoutBatchNorm):
    """BatchNorm over (N, C) or (N, C, L) input, as torch.nn.BatchNorm1d."""

    _ndims = (2, 3)


class BatchNorm2d(_TorchLayoutBatchNorm):
    """BatchNorm over (N, C, H, W) input, as torch.nn.BatchNorm2d."""

    _ndims = (4,)


class BatchNorm3d(_TorchLayoutBatchNorm):
    """BatchNorm over (N, C, D, H, W) input, as torch.nn.BatchNorm3d."""

    _ndims = (5,)
