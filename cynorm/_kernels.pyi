# Stub of the compiled module cynorm._kernels (pyx/_kernels.pyx, which includes pyx/kernels.pxi); cynorm._kernels_avx2 and _kernels_avx512 are the same module built for wider
# vector units.  The outputs and the fast argument checks are cynorm._runtime's.  C types in comments.  Arrays: float32 or float64 ndarrays, one dtype per call.
import numpy as np
from numpy.typing import NDArray

ISA: str  # "baseline", "avx2" or "avx512"
FLOAT32_BIG_M2: float  # M2 beyond which a float32 x - mean may overflow
HALF_FLOAT16: int  # layer_norm's and rms_norm's half=: x, y (residual, h) hold float16 or
HALF_BFLOAT16: int  # bfloat16 data (or their uint16 views), weight and bias float32 or the same
RSTD_MAX: dict[str, float]  # the group norms redo a sample whose rstd lies beyond
__test__: dict[str, str]  # Cython's doctest table

_F = NDArray[np.floating]
_F64 = NDArray[np.float64]
_Mask = NDArray[np.bool_] | NDArray[np.uint8]

def openmp_enabled() -> bool: ...
def build_flags() -> str: ...
def layer_norm(
    x: _F, y: _F, D: int, weight: _F | None, bias: _F | None, mean: _F64 | None,
    rstd: _F64 | None, eps: float, n_threads: int, mask: _Mask | None = None,
    write_padding: bool = True, residual: _F | None = None, h: _F | None = None,
    half: int = -1,
) -> None: ...  # D: Py_ssize_t, eps: double, n_threads: int
def rms_norm(
    x: _F, y: _F, D: int, weight: _F | None, rstd: _F64 | None, eps: float, n_threads: int,
    mask: _Mask | None = None, write_padding: bool = True, residual: _F | None = None,
    h: _F | None = None, half: int = -1,
) -> None: ...
def convert_half(src: NDArray[np.generic], dst: NDArray[np.generic], kind: int,
                 n_threads: int) -> None: ...  # float32 <-> 16-bit (kind: HALF_FLOAT16 / _BFLOAT16)
def affine_half(
    x: NDArray[np.generic], y: NDArray[np.generic], rows: int, cols: int, by_rows: bool,
    stats: _F64, var_scale: float, weight: NDArray[np.float32] | None,
    bias: NDArray[np.float32] | None, eps: float, kind: int, n_threads: int,
    mask: _Mask | None = None, write_padding: bool = True, rest: _F64 | None = None,
) -> None: ...  # BatchNorm's output on 16-bit x, y (kind: HALF_FLOAT16 / _BFLOAT16)
def feature_moments(
    x: _F, rows: int, cols: int, C: int, by_rows: bool, stats: _F64, n_threads: int,
    rows_per_block: int = 64, mask: _Mask | None = None, fast: bool = False, half: int = -1,
    rest: _F64 | None = None,
) -> float: ...  # returns the count (double)
def batch_norm_params(
    stats: _F64, var_scale: float, weight: _F | None, bias: _F | None, eps: float, params: _F
) -> None: ...
def normalize_running(
    x: _F, y: _F, rows: int, cols: int, by_rows: bool, running_mean: _F, running_var: _F,
    weight: _F | None, bias: _F | None, eps: float, n_threads: int,
    mask: _Mask | None = None, write_padding: bool = True,
) -> None: ...
def update_running(
    running_mean: _F, running_var: _F, stats: _F64, count: float, momentum: float,
    half: int = -1,
) -> None: ...
def normalize(
    x: _F, y: _F, rows: int, cols: int, by_rows: bool, params: _F, n_threads: int,
    mask: _Mask | None = None, write_padding: bool = True,
) -> None: ...
def layer_norm_backward(
    g: _F, x: _F, dx: _F, D: int, weight: _F | None, mean: _F64, rstd: _F64,
    grad_weight: _F | None, grad_bias: _F | None, n_threads: int, mask: _Mask | None = None,
    grad_residual: _F | None = None, half: int = -1,
) -> None: ...  # half >= 0: g, x, dx, grad_residual 16-bit; grad_weight, grad_bias float32
def rms_norm_backward(
    g: _F, x: _F, dx: _F, D: int, weight: _F | None, rstd: _F64, grad_weight: _F | None,
    n_threads: int, mask: _Mask | None = None, grad_residual: _F | None = None,
    half: int = -1,
) -> None: ...
def batch_norm_backward(
    g: _F, x: _F, dx: _F, rows: int, cols: int, C: int, by_rows: bool, mean: _F64,
    invstd: _F64, weight: _F | None, training: bool, grad_weight: _F | None,
    grad_bias: _F | None, n_threads: int, mask: _Mask | None = None, half: int = -1,
) -> None: ...  # half >= 0: g, x, dx 16-bit; grad_weight, grad_bias float32
def group_norm(
    x: _F, y: _F, N: int, C: int, S: int, G: int, channels_last: bool, weight: _F | None,
    bias: _F | None, eps: float, stats: _F64, given: bool, mask: _Mask | None,
    write_padding: bool, n_threads: int,
) -> int: ...
def group_norm_half(
    x: NDArray[np.generic], y: NDArray[np.generic], N: int, C: int, S: int, G: int,
    channels_last: bool, weight: NDArray[np.float32] | None,
    bias: NDArray[np.float32] | None, eps: float, stats: _F64, given: bool,
    mask: _Mask | None, write_padding: bool, kind: int, n_threads: int,
) -> None: ...  # group_norm on 16-bit x, y (kind: HALF_FLOAT16 / _BFLOAT16)
def group_norm_backward(
    g: _F, x: _F, dx: _F, N: int, C: int, S: int, G: int, channels_last: bool, stats: _F64,
    weight: _F | None, fixed: bool, sums: _F64, grad_weight: _F | None,
    grad_bias: _F | None, mask: _Mask | None, n_threads: int, half: int = -1,
) -> int: ...  # half >= 0: g, x, dx 16-bit; weight and the gradients float32
