"""cynorm: fast, accurate, torch-compatible Batch, Layer, RMS, Group and Instance Normalization for NumPy arrays."""
from ._version import __version__

try:
    from . import _isa  # noqa: F401  (imports the compiled kernels)
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    import os as _os

    _here = _os.path.dirname(_os.path.abspath(__file__))
    _hint = (
        f"This is cynorm's source tree ({_here}) and its extension is not built here: run from "
        "another directory to use an installed cynorm, or build in place with `pip install -e .`."
        if _os.path.isdir(_os.path.join(_here, "..", "pyx"))
        else "Reinstall cynorm (`pip install cynorm`, or `pip install .` from a source tree with "
        "a C compiler)."
    )
    raise ImportError(
        f"cynorm's compiled extension cynorm._kernels could not be imported ({exc}). {_hint}"
    ) from exc

from ._config import default_output_cache as _default_output_cache, show_config
from ._runtime import output_cache_info, set_output_cache
from ._moments import Moments, moments
from ._threads import get_num_threads, num_threads, set_num_threads
from .functional import (add_layer_norm, add_rms_norm, batch_norm, batch_norm_backward,
                         group_norm, group_norm_backward, instance_norm, instance_norm_backward,
                         layer_norm, layer_norm_backward, rms_norm, rms_norm_backward)
from .layers import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, GroupNorm,
                     InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm)

set_output_cache(_default_output_cache())

__all__ = [
    "__version__",
    "layer_norm",
    "batch_norm",
    "layer_norm_backward",
    "batch_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "add_layer_norm",
    "add_rms_norm",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "LayerNorm",
    "RMSNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "Moments",
    "moments",
    "show_config",
    "get_num_threads",
    "set_num_threads",
    "num_threads",
    "set_output_cache",
    "output_cache_info",
]
