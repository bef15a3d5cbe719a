"""Build script for cynorm: compiler logic lives here, metadata in pyproject.toml.

Environment variables
---------------------
CYNORM_DEBUG=1    turn Cython's bounds/wraparound/initialized checks back on and build with -O0 -g
                  (scripts: `bash .ci/debug` builds so and runs the test suite).
CYNORM_OPENMP=0   build without OpenMP (serial kernels); =1 require it; unset: probe the compiler.
CYNORM_ISA_VARIANTS=0  build only the baseline kernels (no AVX2 / AVX-512 variants on x86-64).
"""
import glob
import os
import platform
import shutil
import sys
import tempfile
import textwrap

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CYNORM_DEBUG", "0") not in ("", "0")

# One dict of directives for the whole build; the debug switch flips the checks back on.
# cdivision stays on in debug builds too: the kernels rely on IEEE float division (1/0 = inf,
# 0/0 = NaN, as torch gives for a zero variance with eps = 0); Python semantics would raise
# inside nogil code and change the results under test.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

OPENMP_PROGRAM = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP, or None when the compiler lacks it."""
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp(prefix="cynorm-omp-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(OPENMP_PROGRAM)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=lflags)
            return cflags, lflags
        except Exception:  # any compile or link failure means "not this flag set"
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


# Extra builds of the same kernels for wider vector units, picked at import by cynorm/_isa.py.
# Flags for GCC and Clang; an x86-64 compiler of another kind builds the baseline only.
ISA_VARIANTS = {
    "cynorm._kernels_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "cynorm._kernels_avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512cd", "-mavx512dq",
                               "-mavx512bw", "-mavx512vl", "-mprefer-vector-width=512"],
}
WANT_VARIANTS = (
    platform.machine().lower() in ("x86_64", "amd64")
    and sys.platform != "win32"
    and os.environ.get("CYNORM_ISA_VARIANTS", "1") != "0"
)


class BuildExt(build_ext):
    def build_extensions(self):
        # Always compile: objects left by an earlier build may have other flags (OpenMP on or
        # off, debug checks), and setuptools would reuse them as "up to date".
        self.force = True
        choice = os.environ.get("CYNORM_OPENMP", "").strip()
        is_msvc = self.compiler.compiler_type == "msvc"
        flags = None
        if choice != "0":
            flags = _openmp_flags(self.compiler)
            if flags is None and choice == "1":
                raise RuntimeError("CYNORM_OPENMP=1 but the compiler cannot build an OpenMP program")
            if flags is None:
                print("WARNING: the compiler does not accept OpenMP; cynorm is built serially.", file=sys.stderr)
        if is_msvc:
            base = ["/Od", "/Zi"] if DEBUG else ["/O2"]
        else:
            # -O3 vectorizes the multi-accumulator loops; no -ffast-math: NaN/inf must behave.
            # -fno-math-errno: sqrt becomes one instruction (errno is never read here).
            base = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
            base += ["-Wno-unused-function", "-Wno-unreachable-code"]
        cflags = base + (flags[0] if flags else [])
        lflags = flags[1] if flags else []
        for ext in self.extensions:
            if ext.name.split(".")[1] in FRONT_END:  # Python code: no OpenMP, no ISA flags
                ext.extra_compile_args = ["/O2"] if is_msvc else ["-O2"]
                continue
            summary = "compile: %s; link: %s" % (
                " ".join(cflags + ISA_VARIANTS.get(ext.name, [])), " ".join(lflags) or "-")
            ext.extra_compile_args = cflags + ISA_VARIANTS.get(ext.name, [])
            ext.extra_link_args = lflags
            ext.define_macros = list(ext.define_macros or []) + [
                ("CYNORM_BUILD_FLAGS", '"%s"' % summary.replace('"', "")),
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            ]
        super().build_extensions()


# The Python front end (argument checks, dtype policy, dispatch) compiled from its .py sources:
# a small call's cost is mostly this code, and compiled it runs about a third faster
# (benchmarks/RESULTS.md, item 24).  The .py files stay the source of truth and are
# shipped too; Python semantics are kept (no C division or typing directives here).
FRONT_END = ["_validation", "_threads", "_outputs", "_module", "_rows", "_layer_norm", "_rms_norm",
             "_groups", "_group_norm", "_instance_norm",
             "_batch_norm", "_batch_norm_layers", "_moments", "functional", "layers"]
FRONT_END_DIRECTIVES = {"language_level": 3, "binding": True, "embedsignature": False}

# The kernels, one module per instruction set; the runtime (outputs, fast checks) once.
names = ["cynorm._kernels"] + (list(ISA_VARIANTS) if WANT_VARIANTS else [])
extensions = [
    Extension(name, ["pyx/%s.pyx" % name.split(".")[1]], include_dirs=["pyx", np.get_include()],
              depends=["pyx/kernels.pxi", "pyx/_common.pxd", "pyx/policy.h"]
              + sorted(glob.glob("pyx/core/*")) + sorted(glob.glob("pyx/ops/*")))
    for name in names
] + [Extension("cynorm._runtime", ["pyx/_runtime.pyx"], include_dirs=["pyx", np.get_include()],
               depends=["pyx/_common.pxd", "pyx/_pool.h", "pyx/policy.h"])]

front_end = [Extension("cynorm." + name, ["cynorm/%s.py" % name]) for name in FRONT_END]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=DIRECTIVES,
        include_path=["pyx"],
        gdb_debug=False,
    ) + cythonize(front_end, compiler_directives=FRONT_END_DIRECTIVES, build_dir="build/front"),
    cmdclass={"build_ext": BuildExt},
)
