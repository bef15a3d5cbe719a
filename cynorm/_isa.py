"""Pick the kernels module built for the widest instruction set this CPU runs.

The same kernels are compiled for the platform's baseline and, on x86-64, for AVX2 and AVX-512
(setup.py).  ``CYNORM_ISA=baseline|avx2|avx512`` forces one (an error if it cannot run here).
"""
import importlib
import os

from . import _kernels as _baseline
from ._runtime import cpu_supports

LEVELS = {"baseline": (0, "_kernels"), "avx2": (1, "_kernels_avx2"), "avx512": (2, "_kernels_avx512")}


def load(name):
    """The kernels module for ISA ``name``, or None when it was not built or cannot run here."""
    level, module = LEVELS[name]
    if not cpu_supports(level):
        return None
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return None


def available():
    """ISA names whose kernels were built and run on this CPU, widest first."""
    return [name for name in ("avx512", "avx2", "baseline") if load(name) is not None]


def _select():
    forced = os.environ.get("CYNORM_ISA", "").strip().lower()
    if forced:
        if forced not in LEVELS:
            raise ImportError(f"CYNORM_ISA={forced!r}: expected one of {', '.join(LEVELS)}")
        module = load(forced)
        if module is None:
            raise ImportError(f"CYNORM_ISA={forced!r}: those kernels were not built or this "
                              "CPU cannot run them")
        return module
    for name in ("avx512", "avx2"):
        module = load(name)
        if module is not None:
            return module
    return _baseline


kernels = _select()
