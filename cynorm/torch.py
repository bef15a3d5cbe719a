"""cynorm's kernels under torch autograd: functions and drop-in modules for CPU models.

Needs torch; ``import cynorm`` never imports this module.  CPU tensors of float16, float32 and
float64 are passed to the kernels without copies (``Tensor.numpy()`` shares memory, so the
running statistics of BatchNorm are updated in place); bfloat16 tensors too, seen as 16-bit
integers and then as ml_dtypes' bfloat16 (ml_dtypes is imported at the first one); other
devices and dtypes raise.  Results have the input's dtype.

    import cynorm.torch
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), cynorm.torch.LayerNorm(32))

First derivatives only (``once_differentiable``).
"""
import torch
from torch.autograd.function import once_differentiable

from . import functional as F

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "batch_norm", "group_norm",
           "instance_norm", "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]

_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


def _bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype (imported at the first bfloat16 tensor)."""
    try:
        import ml_dtypes  # noqa: PLC0415 - only bfloat16 tensors need it
    except ImportError:
        raise TypeError("cynorm.torch needs ml_dtypes for bfloat16 tensors "
                        "(pip install ml_dtypes)") from None
    return ml_dtypes.bfloat16


def _np(t):
    if t is None:
        return None
    if t.device.type != "cpu":
        raise ValueError(f"cynorm.torch works on CPU tensors, got a tensor on {t.device}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"cynorm.torch takes float16, bfloat16, float32 or float64 tensors, got "
                        f"{t.dtype}")
    if t.dtype is torch.bfloat16:  # the same memory, as bits, then as ml_dtypes' bfloat16
        return t.detach().view(torch.int16).numpy().view(_bfloat16())
    return t.detach().numpy()


def _from_np(a):
    """A tensor sharing a's memory (bfloat16 through its bits)."""
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view("int16")).view(torch.bfloat16)
    return torch.from_numpy(a)


def _tensor(a, like):
    return None if a is None else _from_np(a).to(like.dtype)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        y, mean, rstd = F.layer_norm(_np(x), normalized_shape, _np(weight), _np(bias), eps,
                                     return_stats=True)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, rstd, tuple(normalized_shape))
        return _from_np(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        mean, rstd, normalized_shape = ctx.stats
        dx, dw, db = F.layer_norm_backward(_np(grad_out), _np(x), mean, rstd, normalized_shape,
                                           _np(weight), _np(bias))
        return _tensor(dx, x), None, _tensor(dw, weight), _tensor(db, bias), None


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, rstd = F.rms_norm(_np(x), normalized_shape, _np(weight), eps, return_stats=True)
        ctx.save_for_backward(x, weight)
        ctx.stats = (rstd, normalized_shape)
        return _from_np(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        rstd, normalized_shape = ctx.stats
        dx, dw = F.rms_norm_backward(_np(grad_out), _np(x), rstd, normalized_shape,
                                     _np(weight))
        return _tensor(dx, x), None, _tensor(dw, weight), None


class _AddNormFunction(torch.autograd.Function):
    """(y, h) of add_layer_norm (bias given or not) or add_rms_norm (centred False)."""

    @staticmethod
    def forward(ctx, x, residual, normalized_shape, weight, bias, eps, centred):
        if centred:
            y, h, mean, rstd = F.add_layer_norm(_np(x), _np(residual), normalized_shape,
                                                _np(weight), _np(bias), eps, return_stats=True)
        else:
            y, h, rstd = F.add_rms_norm(_np(x), _np(residual), normalized_shape, _np(weight),
                                        eps, return_stats=True)
            mean = None
        h = _from_np(h)
        ctx.save_for_backward(h, weight, bias)
        ctx.stats = (mean, rstd, normalized_shape, centred)
        return _from_np(y), h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h):
        h, weight, bias = ctx.saved_tensors
        mean, rstd, normalized_shape, centred = ctx.stats
        gh = None if grad_h is None else _np(grad_h.contiguous())
        db = None
        if centred:
            dh, dw, db = F.layer_norm_backward(_np(grad_y), _np(h), mean, rstd,
                                               normalized_shape, _np(weight), _np(bias),
                                               grad_residual=gh)
        else:
            dh, dw = F.rms_norm_backward(_np(grad_y), _np(h), rstd, normalized_shape,
                                         _np(weight), grad_residual=gh)
        dh = _tensor(dh, h)
        return dh, dh, None, _tensor(dw, weight), _tensor(db, bias), None, None


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        y, mean, invstd = F.batch_norm(_np(x), _np(running_mean), _np(running_var),
                                       _np(weight), _np(bias), training, momentum, eps,
                                       axis=1, return_stats=True)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, invstd, training)
        return _from_np(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        mean, invstd, training = ctx.stats
        dx, dw, db = F.batch_norm_backward(_np(grad_out), _np(x), mean, invstd, _np(weight),
                                           training, axis=1, bias=_np(bias))
        return _tensor(dx, x), None, None, _tensor(dw, weight), _tensor(db, bias), None, None, None


def _channels(t):
    """A tensor as the group norms' kernels read it: (array, axis).  A channels_last (or
    channels_last_3d) tensor is read as its (N, *, C) memory, without a copy."""
    a = _np(t)
    if t.dim() in (4, 5) and not t.is_contiguous():
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous(memory_format=fmt):
            return a.transpose((0,) + tuple(range(2, t.dim())) + (1,)), -1
    return a, 1


def _from_channels(a, axis):
    """The kernels' result as a tensor of the input's layout (channels_last stays so)."""
    if axis == -1:
        a = a.transpose((0, a.ndim - 1) + tuple(range(1, a.ndim - 1)))
    return _from_np(a)


class _GroupNormFunction(torch.autograd.Function):
    """group_norm (num_groups given) or instance_norm (num_groups None)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, running, use_input_stats, momentum):
        a, axis = _channels(x)
        if num_groups is None:
            rm, rv = running
            y, mean, rstd = F.instance_norm(a, _np(rm), _np(rv), _np(weight), _np(bias),
                                            use_input_stats, momentum, eps, axis=axis,
                                            return_stats=True)
        else:
            y, mean, rstd = F.group_norm(a, num_groups, _np(weight), _np(bias), eps,
                                         axis=axis, return_stats=True)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, rstd, num_groups, use_input_stats)
        return _from_channels(y, axis)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        mean, rstd, num_groups, use_input_stats = ctx.stats
        a, axis = _channels(x)
        g = _np(grad_out)
        g = g.transpose((0,) + tuple(range(2, g.ndim)) + (1,)) if axis == -1 else g
        if num_groups is None:
            dx, dw, db = F.instance_norm_backward(g, a, mean, rstd, _np(weight),
                                                  use_input_stats=use_input_stats,
                                                  bias=_np(bias), axis=axis)
        else:
            dx, dw, db = F.group_norm_backward(g, a, mean, rstd, num_groups, _np(weight),
                                               bias=_np(bias), axis=axis)
        return (_from_channels(dx, axis).to(x.dtype), None, _tensor(dw, weight),
                _tensor(db, bias), None, None, None, None)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.group_norm on cynorm's kernels (CPU; channels_last read as is)."""
    return _GroupNormFunction.apply(x, int(num_groups), weight, bias, float(eps), None, True,
                                    None)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """torch.nn.functional.instance_norm on cynorm's kernels (CPU); buffers updated in place
    (not at all with momentum=None)."""
    return _GroupNormFunction.apply(x, None, weight, bias, float(eps),
                                    (running_mean, running_var), bool(use_input_stats),
                                    None if momentum is None else float(momentum))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm on cynorm's kernels (CPU)."""
    return _LayerNormFunction.apply(x, _shape(normalized_shape), weight, bias, float(eps))


def _shape(normalized_shape):
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm on cynorm's kernels (CPU)."""
    return _RMSNormFunction.apply(x, _shape(normalized_shape), weight,
                                  None if eps is None else float(eps))


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(y, h): h = x + residual and y = layer_norm(h) in one pass, differentiable in both."""
    return _AddNormFunction.apply(x, residual, _shape(normalized_shape), weight, bias,
                                  float(eps), True)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None):
    """(y, h): h = x + residual and y = rms_norm(h) in one pass, differentiable in both."""
    return _AddNormFunction.apply(x, residual, _shape(normalized_shape), weight, None,
                                  None if eps is None else float(eps), False)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm on cynorm's kernels (CPU); buffers updated in place."""
    return _BatchNormFunction.apply(x, running_mean, running_var, weight, bias, bool(training),
                                    float(momentum), float(eps))


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm computed by cynorm."""

    def forward(self, x):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm computed by cynorm."""

    def forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class _CynormBatchNorm:
    """forward of torch's _BatchNorm (momentum, cumulative average, buffers) on cynorm."""

    def forward(self, x):
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None \
                else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return batch_norm(x, self.running_mean if keep else None,
                          self.running_var if keep else None, self.weight, self.bias, use_batch,
                          factor, self.eps)


class BatchNorm1d(_CynormBatchNorm, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by cynorm."""


class BatchNorm2d(_CynormBatchNorm, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by cynorm."""


class BatchNorm3d(_CynormBatchNorm, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by cynorm."""


class GroupNorm(torch.nn.GroupNorm):
    """torch.nn.GroupNorm computed by cynorm."""

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _CynormInstanceNorm:
    """torch's _InstanceNorm (checks, unbatched input) with the normalization on cynorm."""

    def _apply_instance_norm(self, x):
        return instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats, self.momentum,
                             self.eps)


class InstanceNorm1d(_CynormInstanceNorm, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by cynorm."""


class InstanceNorm2d(_CynormInstanceNorm, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by cynorm."""


class InstanceNorm3d(_CynormInstanceNorm, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by cynorm."""
