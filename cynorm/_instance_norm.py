"""InstanceNorm: ``instance_norm``, ``instance_norm_backward`` (torch.nn.functional semantics)
and the ``InstanceNorm1d`` / ``2d`` / ``3d`` layers.  InstanceNorm is GroupNorm with one channel
per group, on the group norms' front end (_groups.py); the running statistics are the batch
average of the per-instance ones.  Kernels: pyx/ops/group_norm.pxi."""
import warnings

import numpy as np

from . import _groups
from ._module import _Module, _layer_dtype, _positive_int
from ._validation import as_array, is_bfloat16, real_scalar

__all__ = ["instance_norm", "instance_norm_backward", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d"]


def _running(value, name, C):
    """A running buffer: a float ndarray of C elements, updated in place."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or (value.dtype.kind != "f"
                                             and not is_bfloat16(value.dtype)):
        raise TypeError(f"{name} must be a float numpy.ndarray (it is updated in place), got "
                        f"{type(value).__name__}")
    if value.size != C:
        raise RuntimeError(f"{name} should contain {C} elements not {value.size}")
    return value


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False, mask=None, lengths=None):
    """Instance normalization, as torch.nn.functional.instance_norm: each (sample, channel) is
    normalized by its own mean and biased variance over the spatial positions.

    x is (N, C, *), or channels-last (N, *, C) with ``axis=-1``.  With ``use_input_stats``
    (the default) the input's statistics are used, and ``running_mean`` / ``running_var``
    (C,), when given, are updated in place with the batch average of the per-instance mean and
    unbiased variance: ``running = (1 - momentum) * running + momentum * batch`` (with
    ``momentum=None`` they are left alone, as torch 2.13 does).  Otherwise the running
    statistics normalize, as constants.  weight and bias are per channel.  ``out``,
    ``return_stats`` (mean and rstd (N, C), float64), ``mask`` and ``lengths`` are as in
    group_norm; with a mask the running statistics come from the real positions, and
    instances with fewer than 2 real positions (no unbiased variance) are left out of them.
    """
    inp = _groups.GroupInput(x, "instance_norm", axis)
    N, C = inp.N, inp.C
    w = inp.channel_param(weight, "weight", "instance_norm")
    b = inp.channel_param(bias, "bias", "instance_norm")
    rm = _running(running_mean, "running_mean", C)
    rv = _running(running_var, "running_var", C)
    if (rm is None) != (rv is None):
        raise ValueError("instance_norm: give running_mean and running_var together, or "
                         "neither")
    eps = eps if type(eps) is float else real_scalar(eps, "eps")
    if use_input_stats:
        if inp.S <= 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input "
                             f"size {list(inp.shape)}")
        given = None
    else:
        if rm is None or rv is None:
            raise RuntimeError("Expected running_mean and running_var to be defined when "
                               "use_input_stats is false")
        given = np.empty((6, N * C))
        given[0] = 1.0
        given[1] = np.tile(rm.astype(np.float64), N)
        given[2] = 0.0
        given[3] = np.tile(rv.astype(np.float64), N)
    row_mask = inp.mask(mask, lengths, "instance_norm")
    y, stats, mean, rstd = _groups.forward(inp, C, w, b, eps, out, row_mask, given)
    if use_input_stats and rm is not None and momentum is not None and N:
        _update_running(rm, rv, stats, N, C, real_scalar(momentum, "momentum"))
    return (y, mean, rstd) if return_stats else y


def _update_running(rm, rv, stats, N, C, momentum):
    """The running statistics from the per-instance moments (count, hi, lo, M2)."""
    count, hi, lo, m2 = (s.reshape(N, C) for s in stats[:4])
    valid = count >= 2
    n = valid.sum(axis=0)
    if not n.any():
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(valid, hi + lo, 0.0).sum(axis=0) / n
        var = np.where(valid, m2 / (count - 1), 0.0).sum(axis=0) / n
    keep = n > 0
    rm[keep] = ((1 - momentum) * rm.astype(np.float64) + momentum * mean)[keep]
    rv[keep] = ((1 - momentum) * rv.astype(np.float64) + momentum * var)[keep]


def instance_norm_backward(grad_out, x, mean, rstd, weight=None, *, use_input_stats=True,
                           bias=None, axis=1, mask=None, lengths=None):
    """Gradients of instance_norm: (grad_input, grad_weight, grad_bias).

    ``mean`` and ``rstd`` ((N, C), or (C,) for every sample) are what ``instance_norm(...,
    return_stats=True)`` returned.  With ``use_input_stats=False`` they are the running
    statistics, constants: ``dx = grad_out * weight * rstd``.  The rest is as in
    group_norm_backward.
    """
    return _groups.backward_call("instance_norm_backward", None, grad_out, x, mean, rstd, weight,
                                 bias, axis, mask, lengths, not use_input_stats)


class _InstanceNorm(_Module):
    """Instance normalization, as torch.nn.InstanceNorm*d.

    Without ``track_running_stats`` (the default) the input's statistics are always used.
    With it, training uses the input's statistics and updates ``running_mean`` /
    ``running_var`` with ``momentum`` (not at all with ``momentum=None``, as torch 2.13), and
    eval normalizes with them; ``num_batches_tracked`` stays 0, as in torch.  ``affine`` adds
    per-channel ``weight`` (alias ``alpha``) and ``bias`` (alias ``beta``; absent with
    ``bias=False``).  Unbatched input (one dim fewer) is accepted.  ``axis=-1`` takes
    channels-last input.  Training calls on one layer are serialized by a lock.
    """

    _state_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    _batched_ndim = 3

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, *, bias=True, axis=1, dtype=np.float32):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = real_scalar(eps, "eps")
        self.momentum = None if momentum is None else real_scalar(momentum, "momentum")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = _layer_dtype(dtype)
        self._channels(self.num_features, self.affine, bias, self.track_running_stats)

    def _batched(self, x):
        """(x with a batch dim, whether one was added), after torch's ndim and channel checks."""
        x = as_array(x)
        B = self._batched_ndim
        if x.ndim not in (B - 1, B):
            raise ValueError(f"expected {B - 1}D or {B}D input (got {x.ndim}D input)")
        unbatched = x.ndim == B - 1
        dim = (0 if unbatched else 1) if self.axis == 1 else x.ndim - 1
        if x.shape[dim] != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={dim} to match num_features "
                                 f"({self.num_features}), but got: {x.shape[dim]}.")
            warnings.warn(f"input's size at dim={dim} does not match num_features. You can "
                          "silence this warning by not passing in num_features, which is not "
                          "used because affine=False", stacklevel=3)
        return (x[None] if unbatched else x), unbatched

    def forward(self, x, *, mask=None, lengths=None):
        """Normalize x (padding written as 0 with mask= or lengths=, for (N, C, L) input).  The
        input and the statistics it was normalized with are kept for backward."""
        self._saved = None
        x, unbatched = self._batched(x)
        use_input = self.training or not self.track_running_stats
        with self._lock:
            y, mean, rstd = instance_norm(x, self.running_mean, self.running_var, self.weight,
                                          self.bias, use_input, self.momentum, self.eps,
                                          axis=self.axis, return_stats=True, mask=mask,
                                          lengths=lengths)
            self._saved = (x, mean, rstd, mask, lengths, use_input, unbatched)
        return y[0] if unbatched else y

    def backward(self, grad_out):
        """grad_input of the last forward, in the mode it ran in; sets grad_weight and
        grad_bias.  After an eval forward with running statistics, those are constants.  The
        input is kept by reference: do not modify it in between."""
        x, mean, rstd, mask, lengths, use_input, unbatched = self._need_saved()
        g = as_array(grad_out, "grad_out")
        dx, self.grad_weight, self.grad_bias = instance_norm_backward(
            g[None] if unbatched else g, x, mean, rstd, self.weight,
            use_input_stats=use_input, bias=self.bias, axis=self.axis, mask=mask,
            lengths=lengths)
        return dx[0] if unbatched else dx

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")


class InstanceNorm1d(_InstanceNorm):
    """InstanceNorm over (N, C, L) or unbatched (C, L) input, as torch.nn.InstanceNorm1d."""

    _batched_ndim = 3


class InstanceNorm2d(_InstanceNorm):
    """InstanceNorm over (N, C, H, W) or unbatched (C, H, W) input, as torch.nn.InstanceNorm2d."""

    _batched_ndim = 4


class InstanceNorm3d(_InstanceNorm):
    """InstanceNorm over (N, C, D, H, W) or (C, D, H, W) input, as torch.nn.InstanceNorm3d."""

    _batched_ndim = 5
