"""show_config(): what was built and how it will run."""
import importlib.machinery
import os
import pathlib
import platform
import sys

import numpy as np

from ._isa import available, kernels as _kernels
from ._runtime import output_cache_info
from ._threads import get_num_threads
from ._version import __version__


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compiled_front_end():
    """The package's .py modules that also exist compiled (setup.py's FRONT_END): Python imports
    the compiled one."""
    pkg = pathlib.Path(__file__).parent
    return sorted(
        p.stem for p in pkg.glob("*.py")
        if any((pkg / (p.stem + suffix)).exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    )


def config_info():
    """The facts show_config prints, as a dict."""
    return {
        "cynorm": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "openmp": _kernels.openmp_enabled(),
        "isa": _kernels.ISA,
        "isa_available": available(),
        "threads": get_num_threads(),
        "build_flags": _kernels.build_flags(),
        "front_end": compiled_front_end(),
        "output_cache": output_cache_info(),
    }


def default_output_cache():
    """The output cache's byte limit at import: ``CYNORM_OUTPUT_CACHE`` (bytes, or with a
    K / M / G suffix; 0 turns it off) if set, else 1 GiB or a sixteenth of the machine's
    memory, whichever is smaller."""
    value = os.environ.get("CYNORM_OUTPUT_CACHE", "").strip()
    if value:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        scale = units.get(value[-1].upper(), 1)
        try:
            n = int(value[:-1] if scale > 1 else value) * scale
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"CYNORM_OUTPUT_CACHE={value!r}: expected a byte count such as "
                             "0, 268435456 or 256M")
        return n
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 16 << 30
    return min(1 << 30, memory // 16)


def show_config():
    """Print versions, whether OpenMP is compiled in, the thread count and the build flags."""
    info = config_info()
    print(f"cynorm {info['cynorm']}")
    print(f"  python       {info['python']}")
    print(f"  numpy        {info['numpy']}")
    print(f"  platform     {info['platform']}")
    print(f"  cpu          {info['cpu']}")
    print(f"  OpenMP       {'enabled' if info['openmp'] else 'disabled (built serially)'}")
    print(f"  threads      {info['threads']}")
    print(f"  kernels      {info['isa']} (built and runnable here: {', '.join(info['isa_available'])})")
    print(f"  build flags  {info['build_flags']}")
    print(f"  front end    compiled: {', '.join(info['front_end']) or 'none (interpreted)'}")
    cache = info["output_cache"]
    print(f"  output cache {cache['limit'] >> 20} MiB for outputs of {cache['min_size'] >> 20} "
          f"MiB and more ({cache['held'] >> 20} MiB held in {cache['blocks']} blocks; "
          f"{cache['hits']} reused, {cache['misses']} new)")
