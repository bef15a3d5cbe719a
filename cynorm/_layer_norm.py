"""LayerNorm: ``layer_norm``, ``layer_norm_backward`` (torch.nn.functional semantics) and the
``LayerNorm`` layer.  Kernels: pyx/ops/layer_norm.pxi."""
import math

import numpy as np

from ._isa import kernels as _kernels
from ._module import _Module, _layer_dtype
from ._outputs import _finish, _grad_like, _in_result_dtype, _kernel_input, _output
from ._threads import threads_for
from ._validation import (
    as_array,
    check_out,
    dtypes,
    grad_outputs,
    layer_norm_shape,
    normalized_shape as _normalized_shape,
    param,
    real_scalar,
    row_mask as _row_mask,
    saved as _saved,
)

__all__ = ["layer_norm", "layer_norm_backward", "LayerNorm"]


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
    x, cdt, rdt, nshape, rows, cols = _layer_norm_input(x, normalized_shape, "layer_norm")
    if type(eps) is not float:
        eps = real_scalar(eps, "eps")
    w = param(weight, "weight", nshape, cdt)
    b = param(bias, "bias", nshape, cdt)
    shape = x.shape
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _row_mask(mask, lengths, shape[: len(shape) - len(nshape)], "layer_norm")
    if out is not None:
        check_out(out, shape, rdt)
    stats = None
    if return_stats:
        batch = shape[: len(shape) - len(nshape)] + (1,) * len(nshape)
        stats = np.full((2,) + batch, np.nan)
    size = x.size
    if size == 0:
        y = np.empty(shape, dtype=rdt) if out is None else out
        return (y, stats[0], stats[1]) if return_stats else y
    x = _kernel_input(x, cdt, rows, cols)
    y, result, write_padding = _output(x, shape, rows, cols, cdt, rdt, out, (w, b),
                                       row_mask is not None)
    mean = rstd = None
    if return_stats:
        mean, rstd = stats[0].reshape(rows), stats[1].reshape(rows)
    _kernels.layer_norm(x, y, cols, w, b, mean, rstd, eps, threads_for(size), row_mask,
                        write_padding)
    y = _finish(y, result, shape, rdt, out)
    return (y, stats[0], stats[1]) if return_stats else y


def _layer_norm_input(x, normalized_shape, op):
    """The one validator of LayerNorm inputs: (x, compute dtype, result dtype,
    normalized_shape, rows, cols)."""
    fast = layer_norm_shape(x, normalized_shape)
    if fast is not None:  # float32 / float64 over the last dim
        dt, nshape, rows, cols = fast
        return x, dt, dt, nshape, rows, cols
    if type(x) is not np.ndarray:
        x = as_array(x)
    cdt, rdt = dtypes(x.dtype, op)
    nshape = _normalized_shape(normalized_shape)
    shape = x.shape
    k = len(nshape)
    if len(shape) < k or shape[len(shape) - k:] != nshape:
        raise ValueError(
            f"Given normalized_shape={list(nshape)}, expected input with shape "
            f"[*, {', '.join(map(str, nshape))}], but got input of size {list(shape)}"
        )
    cols = nshape[0] if k == 1 else math.prod(nshape)
    rows = x.size // cols if cols else math.prod(shape[: len(shape) - k])
    return x, cdt, rdt, nshape, rows, cols


def layer_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight=None, bias=None, *,
                        mask=None, lengths=None):
    """Gradients of layer_norm: (grad_input, grad_weight, grad_bias).

    ``mean`` and ``rstd`` are the statistics ``layer_norm(..., return_stats=True)`` returned
    (one per row, any shape of that size); nothing is recomputed.  grad_weight is None without
    ``weight``, grad_bias None without ``bias`` (only its presence matters).  Gradients are
    accumulated in float64 and returned in x's result dtype; grad_weight and grad_bias are
    summed over rows from per-thread partial sums: deterministic for a given thread count.
    With ``mask`` / ``lengths`` (as in layer_norm), padding rows get a zero gradient and add
    nothing to grad_weight and grad_bias.
    """
    x, cdt, rdt, nshape, rows, cols = _layer_norm_input(x, normalized_shape,
                                                        "layer_norm_backward")
    g = _grad_like(grad_out, x, cdt, rows, cols)
    w = param(weight, "weight", nshape, cdt)
    if bias is not None:
        param(bias, "bias", nshape, cdt)
    mean = _saved(mean, "mean", rows)
    rstd = _saved(rstd, "rstd", rows)
    row_mask = None
    if mask is not None or lengths is not None:
        row_mask = _row_mask(mask, lengths, x.shape[: x.ndim - len(nshape)], "layer_norm_backward")
    dx, grad_w, grad_b = grad_outputs(x, cdt, nshape, w is not None, bias is not None)
    _kernels.layer_norm_backward(g, _kernel_input(x, cdt, rows, cols), dx, cols, w, mean, rstd,
                                 grad_w, grad_b, threads_for(x.size), row_mask)
    if rdt is cdt:
        return dx, grad_w, grad_b
    return _in_result_dtype(rdt, cdt, dx, grad_w, grad_b)


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
