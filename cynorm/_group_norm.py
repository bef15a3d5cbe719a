"""GroupNorm: ``group_norm``, ``group_norm_backward`` (torch.nn.functional semantics) and the
``GroupNorm`` layer, on the group norms' front end (_groups.py).  Kernels:
pyx/ops/group_norm.pxi."""
import numpy as np

from . import _groups
from ._module import _Module, _layer_dtype, _positive_int
from ._validation import real_scalar

__all__ = ["group_norm", "group_norm_backward", "GroupNorm"]


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False, mask=None, lengths=None):
    """Group normalization, as torch.nn.functional.group_norm.

    The C channels of each sample are split into ``num_groups`` groups of C / num_groups; each
    (sample, group) is normalized by the mean and biased variance of its channels over every
    spatial position: y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c].

    Parameters
    ----------
    x : array_like
        (N, C, *) input; with ``axis=-1``, channels-last (N, *, C), e.g. (N, H, W, C).
    num_groups : int
        Must divide C (RuntimeError otherwise, as torch).
    weight, bias : array_like (C,), optional
        The per-channel affine alpha (new standard deviation) and beta (new mean).
    eps : float
        Added to the variance.
    axis : int
        The channel axis: 1 (torch's layout) or -1 (channels-last).
    out : ndarray, optional
        Where to write the result (x's shape, the result dtype); may be x itself.
    return_stats : bool
        Also return ``mean`` and ``rstd = 1 / sqrt(var + eps)``, float64 of shape
        (N, num_groups), for group_norm_backward.
    mask : bool array (N, L), optional
        For (N, C, L) or channels-last (N, L, C) input: True at real positions.  Statistics
        come from the real positions only and padding is written as 0, so each sample's result
        is that of its sequence cut to its length.  A sample with no real position is all 0,
        with NaN statistics.
    lengths : int array (N,), optional
        Instead of mask: sample n has lengths[n] real positions, then padding.

    Returns
    -------
    ndarray in the input dtype (float16/32/64; float64 for integer and bool input); with
    return_stats, (y, mean, rstd).

    Notes
    -----
    Statistics are accumulated in float64 (Chan's merge of shifted block sums, the mean
    carried as two numbers), in either layout, so float32 results stay within 1e-5 of the
    float64 reference even when the mean lies 1e6 standard deviations from zero.
    """
    inp = _groups.GroupInput(x, "group_norm", axis)
    G = _groups.check_groups(inp, num_groups)
    w = inp.channel_param(weight, "weight", "group_norm")
    b = inp.channel_param(bias, "bias", "group_norm")
    row_mask = inp.mask(mask, lengths, "group_norm")
    eps = eps if type(eps) is float else real_scalar(eps, "eps")
    y, _, mean, rstd = _groups.forward(inp, G, w, b, eps, out, row_mask)
    return (y, mean, rstd) if return_stats else y


def group_norm_backward(grad_out, x, mean, rstd, num_groups, weight=None, *, bias=None, axis=1,
                        mask=None, lengths=None):
    """Gradients of group_norm: (grad_input, grad_weight, grad_bias).

    ``mean`` and ``rstd`` (N, num_groups) are what ``group_norm(..., return_stats=True)``
    returned; nothing is recomputed.  grad_weight is None without ``weight``, grad_bias None
    without ``bias`` (only its presence matters).  Sums are accumulated in float64 per (sample,
    channel) and reduced over the samples in order: the result does not depend on the thread
    count.  With ``mask`` / ``lengths`` (as in group_norm), padding positions get a zero
    gradient and add nothing to the sums.
    """
    return _groups.backward_call("group_norm_backward", num_groups, grad_out, x, mean, rstd,
                                 weight, bias, axis, mask, lengths, False)


class GroupNorm(_Module):
    """Group normalization, as torch.nn.GroupNorm: ``num_channels`` split into ``num_groups``.

    With ``affine`` (the default) ``weight`` (alias ``alpha``) starts at 1 and ``bias`` (alias
    ``beta``, absent with ``bias=False``) at 0, per channel.  Training and eval behave the
    same.  ``axis=-1`` takes channels-last input.
    """

    _state_names = ("weight", "bias")

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True,
                 axis=1, dtype=np.float32):
        super().__init__()
        num_groups = _positive_int(num_groups, "num_groups")
        num_channels = _positive_int(num_channels, "num_channels")
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = real_scalar(eps, "eps")
        self.affine = bool(affine)
        self.axis = int(axis)
        self.dtype = _layer_dtype(dtype)
        self._channels(self.num_channels, self.affine, bias, False)

    def _check(self, x):
        x = np.asarray(x) if not isinstance(x, np.ndarray) else x
        if x.ndim < 2:
            raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received "
                               f"{x.ndim}")
        return x

    def forward(self, x, *, mask=None, lengths=None):
        """Normalize x (padding written as 0 with mask= or lengths=).  The input and its
        statistics are kept for backward, in both modes (they behave the same)."""
        self._saved = None
        x = self._check(x)
        with self._lock:
            y, mean, rstd = group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                       axis=self.axis, return_stats=True, mask=mask,
                                       lengths=lengths)
            self._saved = (x, mean, rstd, mask, lengths)
        return y

    def backward(self, grad_out):
        """grad_input of the last forward; sets grad_weight and grad_bias (None for a missing
        parameter).  The input is kept by reference: do not modify it in between."""
        x, mean, rstd, mask, lengths = self._need_saved()
        dx, self.grad_weight, self.grad_bias = group_norm_backward(
            grad_out, x, mean, rstd, self.num_groups, self.weight, bias=self.bias,
            axis=self.axis, mask=mask, lengths=lengths)
        return dx

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine})")
