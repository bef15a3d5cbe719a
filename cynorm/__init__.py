"""cynorm: fast, accurate, torch-compatible Batch and Layer Normalization for NumPy arrays."""
from ._version import __version__

try:
    from . import _kernels  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "cynorm's compiled extension cynorm._kernels could not be imported "
        f"({exc}). If you are in the source tree, build it first with `pip install -e .` "
        "(needs a C compiler), or install a wheel."
    ) from exc

from ._config import show_config
from ._threads import get_num_threads, num_threads, set_num_threads
from .functional import batch_norm, layer_norm
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, LayerNorm

__all__ = [
    "__version__",
    "layer_norm",
    "batch_norm",
    "LayerNorm",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "show_config",
    "get_num_threads",
    "set_num_threads",
    "num_threads",
]
