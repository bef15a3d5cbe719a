"""RMSNorm: ``rms_norm``, ``add_rms_norm``, ``rms_norm_backward`` (torch.nn.functional
semantics) and the ``RMSNorm`` layer, on the row norms' front end (_rows.py).  Kernels:
pyx/ops/rms_norm.pxi, on the core's row normalizer (the uncentred form)."""
import numpy as np

from ._module import _Module, _layer_dtype
from ._rows import add_row_norm, row_norm, row_norm_backward
from ._validation import normalized_shape as _normalized_shape, real_scalar

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_backward", "RMSNorm"]


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False,
             mask=None, lengths=None):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims, as
    torch.nn.functional.rms_norm: y = x / sqrt(mean(x²) + eps) * weight.

    Parameters
    ----------
    x : array_like
        Input of shape ``(*, *normalized_shape)``.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over (ONNX RMSNormalization's ``axis`` is
        ``normalized_shape = x.shape[axis:]``).
    weight : array_like of shape ``normalized_shape``, optional
        The scale.
    eps : float or None
        Added to the mean square; None is the machine epsilon of the compute dtype (float32's
        for float16 and float32 input, float64's for float64), as torch.
    out : ndarray, optional
        Where to write the result: same shape as x and the result dtype; may be x itself.
    return_stats : bool
        Also return the per-row ``rstd = 1 / sqrt(mean(x²) + eps)`` (float64, shape
        ``(*, 1, ..., 1)``), for rms_norm_backward.
    mask, lengths
        Padding rows, as in layer_norm: skipped, their output 0 and their rstd NaN.

    Returns
    -------
    ndarray in the input dtype (float16/32/64), float64 for integer and bool input; with
    return_stats, the tuple (y, rstd).

    Notes
    -----
    The sum of squares is accumulated in float64; a row whose mean square leaves the float
    range (float64 beyond about 1e154) is normalized from the row scaled by a power of two.
    """
    y, _, rstd = row_norm("rms_norm", False, x, normalized_shape, weight, None, eps, out,
                          return_stats, mask, lengths)
    return (y, rstd) if return_stats else y


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None, *, out=None,
                 residual_out=None, return_stats=False, mask=None, lengths=None):
    """The residual add and RMSNorm in one pass: h = x + residual, y = rms_norm(h).  Returns
    (y, h), or (y, h, rstd) with return_stats.  h, ``residual_out`` and ``out`` as in
    add_layer_norm; the other arguments are rms_norm's; its backward is rms_norm_backward with
    ``grad_residual=``."""
    y, h, _, rstd = add_row_norm("add_rms_norm", False, x, residual, normalized_shape, weight,
                                 None, eps, out, residual_out, return_stats, mask, lengths)
    return (y, h, rstd) if return_stats else (y, h)


def rms_norm_backward(grad_out, x, rstd, normalized_shape, weight=None, *, grad_residual=None,
                      mask=None, lengths=None):
    """Gradients of rms_norm: (grad_input, grad_weight), grad_weight None without ``weight``.

    ``rstd`` is the statistic ``rms_norm(..., return_stats=True)`` returned (one per row, any
    shape of that size).  With x̂ = x·rstd and g' = grad_out·weight, grad_input = rstd·g' -
    x̂·rstd·mean(g'·x̂) and grad_weight = Σ grad_out·x̂ over rows, accumulated in float64.
    ``grad_residual`` (add_rms_norm's backward) is added to grad_input in the same pass; with
    ``mask`` / ``lengths``, padding rows get grad_residual (or 0) and add nothing to
    grad_weight.
    """
    dx, dw, _ = row_norm_backward("rms_norm_backward", False, grad_out, x, None, rstd,
                                  normalized_shape, weight, None, mask, lengths, grad_residual)
    return dx, dw


class RMSNorm(_Module):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims, as
    torch.nn.RMSNorm.

    ``weight`` (alias ``alpha``) starts at 1, of shape ``normalized_shape`` and dtype
    ``dtype``; ``eps=None`` is the machine epsilon of the input's compute dtype.  Training and
    eval behave the same.
    """

    _state_names = ("weight",)

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype=np.float32):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = None if eps is None else real_scalar(eps, "eps")
        self.elementwise_affine = bool(elementwise_affine)
        self.dtype = _layer_dtype(dtype)
        self.weight = np.ones(self.normalized_shape, dtype=self.dtype) \
            if self.elementwise_affine else None
        self.bias = None

    def forward(self, x, *, mask=None, lengths=None):
        """Normalize x (padding rows skipped and written as 0 with mask= or lengths=).  The
        input and its rstd are kept for backward."""
        self._saved = None
        y, rstd = rms_norm(x, self.normalized_shape, self.weight, self.eps, return_stats=True,
                           mask=mask, lengths=lengths)
        self._saved = (x, rstd, mask, lengths)
        return y

    def backward(self, grad_out):
        """grad_input of the last forward; sets grad_weight (None without a weight).  The input
        is kept by reference: do not modify it in between."""
        x, rstd, mask, lengths = self._need_saved()
        dx, self.grad_weight = rms_norm_backward(grad_out, x, rstd, self.normalized_shape,
                                                 self.weight, mask=mask, lengths=lengths)
        return dx

    def __repr__(self):
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")
