"""show_config(): what was built and how it will run."""
import importlib.machinery
import pathlib
import platform
import sys

import numpy as np

from ._isa import available, kernels as _kernels
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
    }


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
