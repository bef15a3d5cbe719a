"""The public functions, with torch.nn.functional's semantics; each op family's module holds its
function, its own validation and its docstring (cynorm/_layer_norm.py, _rms_norm.py,
_batch_norm.py, _group_norm.py, _instance_norm.py)."""
from ._batch_norm import batch_norm, batch_norm_backward
from ._group_norm import group_norm, group_norm_backward
from ._instance_norm import instance_norm, instance_norm_backward
from ._layer_norm import add_layer_norm, layer_norm, layer_norm_backward
from ._rms_norm import add_rms_norm, rms_norm, rms_norm_backward

__all__ = ["layer_norm", "batch_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "group_norm", "instance_norm", "layer_norm_backward", "batch_norm_backward",
           "rms_norm_backward", "group_norm_backward", "instance_norm_backward"]
