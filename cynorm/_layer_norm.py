"""LayerNorm: ``layer_norm``, ``add_layer_norm``, ``layer_norm_backward`` (torch.nn.functional
semantics) and the ``LayerNorm`` layer, on the row norms' front end (_rows.py).  Kernels:
pyx/ops/layer_norm.pxi, on the core's row normalizer."""
import numpy as np

from ._module import _Module, _layer_dtype
from ._rows import add_row_norm, row_norm, row_norm_backward
from ._validation import normalized_shape as _normalized_shape, real_scalar

__all__ = ["layer_norm", "add_layer_norm", "layer_norm_backward", "LayerNorm"]


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, mask=None, lengths=None):
    """Layer normalization over the trailing ``normalized_shape`` dims, as torch.nn.functional.

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance of each row.

    Parameters
    ----------
    x : array_like
        Input of shape ``(*, *normalized_shape)``.
    normalized_shape : int or tuple of int
        The trailing dims to normalize over.
    weight, bias : array_like of shape ``normalized_shape``, optional
        The affine alpha (new standard deviation) and beta (new mean).
    eps : float
        Added to the variance.
    out : ndarray, optional
        Where to write the result: same shape as x and the result dtype; may be x itself.
    return_stats : bool
        Also return the per-row ``mean`` and ``rstd = 1 / sqrt(var + eps)`` (float64, shape
        ``(*, 1, ..., 1)`` like torch's native_layer_norm), for layer_norm_backward.
    mask : bool array of the batch dims ``x.shape[:-len(normalized_shape)]``, optional
        True for real tokens.  Padding rows are skipped, not computed: their output is 0 and
        their saved statistics NaN.
    lengths : int array (N,), optional
        Instead of mask, for (N, T, ...) input: sequence n has lengths[n] real tokens.

    Returns
    -------
    ndarray in the input dtype (float16/32/64), float64 for integer and bool input; with
    return_stats, the tuple (y, mean, rstd).

    Notes
    -----
    Statistics are accumulated in float64 (block-wise shifted sums merged by Chan's formula),
    so float32 results stay within 1e-5 of the float64 reference even when the mean lies 1e6
    standard deviations from zero.
    """
    y, mean, rstd = row_norm("layer_norm", True, x, normalized_shape, weight, bias, eps, out,
                             return_stats, mask, lengths)
    return (y, mean, rstd) if return_stats else y


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                   out=None, residual_out=None, return_stats=False, mask=None, lengths=None):
    """The pre-norm block's residual add and LayerNorm in one pass: h = x + residual,
    y = layer_norm(h).  Returns (y, h), or (y, h, mean, rstd) with return_stats.

    h is rounded once to x's dtype, as torch's add; residual must have x's shape and dtype.
    ``residual_out`` (x's shape and dtype) receives h and may be x or residual itself, to
    update the residual stream in place; ``out`` receives y and must not overlap it.  x and
    residual are read once and h is not read back (float32 / float64; other dtypes add, then
    normalize).  With ``mask`` / ``lengths``, padding rows of y are 0 and h is written for
    every row.  The other arguments are layer_norm's; its backward is layer_norm_backward
    with ``grad_residual=``.
    """
    y, h, mean, rstd = add_row_norm("add_layer_norm", True, x, residual, normalized_shape,
                                    weight, bias, eps, out, residual_out, return_stats, mask,
                                    lengths)
    return (y, h, mean, rstd) if return_stats else (y, h)


def layer_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight=None, bias=None, *,
                        grad_residual=None, mask=None, lengths=None):
    """Gradients of layer_norm: (grad_input, grad_weight, grad_bias).

    ``mean`` and ``rstd`` are the statistics ``layer_norm(..., return_stats=True)`` returned
    (one per row, any shape of that size); nothing is recomputed.  grad_weight is None without
    ``weight``, grad_bias None without ``bias`` (only its presence matters).  Gradients are
    accumulated in float64 and returned in x's result dtype; grad_weight and grad_bias are
    summed over rows from per-thread partial sums: deterministic for a given thread count.
    With ``mask`` / ``lengths`` (as in layer_norm), padding rows get a zero gradient and add
    nothing to grad_weight and grad_bias.  ``grad_residual`` (x's shape; add_layer_norm's
    backward): the gradient reaching h from the residual stream, added in the same pass, so
    that grad_input is the whole gradient of h (a padding row's is its grad_residual).
    """
    return row_norm_backward("layer_norm_backward", True, grad_out, x, mean, rstd,
                             normalized_shape, weight, bias, mask, lengths, grad_residual)


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
