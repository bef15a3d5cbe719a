"""The BatchNorm layers: ``BatchNorm`` (any feature axis) and torch's ``BatchNorm1d`` / ``2d`` /
``3d``, with running statistics, exact streaming fits and backward in either mode."""
import numpy as np

from ._batch_norm import _feature_last_mask, _invstd, batch_norm, batch_norm_backward
from ._module import _Module, _layer_dtype, _positive_int
from ._moments import _moments
from ._validation import as_array, dtypes, feature_axis, real_scalar, to_compute

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


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
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = real_scalar(eps, "eps")
        self.momentum = None if momentum is None else real_scalar(momentum, "momentum")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = _layer_dtype(dtype)
        self._channels(self.num_features, self.affine, bias, self.track_running_stats)
        self.moments_ = None

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
