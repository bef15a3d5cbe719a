"""The layers, with torch.nn's semantics, holding NumPy parameters and buffers; each op family's
module holds its own (cynorm/_layer_norm.py, _rms_norm.py, _batch_norm_layers.py,
_group_norm.py, _instance_norm.py), on the base in _module.py."""
from ._batch_norm_layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._group_norm import GroupNorm
from ._instance_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from ._layer_norm import LayerNorm
from ._rms_norm import RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]
