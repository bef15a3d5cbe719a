# The body of every kernels module: cynorm._kernels (the platform's baseline ISA) and its AVX2 /
# AVX-512 builds are this file compiled with different flags (setup.py); cynorm/_isa.py picks
# one at import from the CPU's features.  Only kernels live here: the outputs, the output cache
# and the fast argument checks are cynorm._runtime's (pyx/_runtime.pyx), built once.
#
# The core (pyx/core/) is written once and used by every op: block moments and Chan's merge,
# the two-term mean, the column driver, the store policy, the row driver, the overflow rescue
# and the row normalizer (LayerNorm and RMSNorm, forward and backward), with the vector
# primitives and sums in C headers.  Each op family has its file in pyx/ops/, forward and
# backward: a per-row (or per-block) function, then a driver that runs it over ranges of rows,
# then the entry point Python calls (the row norms' entry points call the core's rows).
#
# The normalized output is computed in the input dtype from ``x - m_hi``, where ``m_hi + m_lo``
# is the float64 mean split into two numbers of the input dtype: the subtraction is exact for
# data far from zero, and m_lo is applied separately (LayerNorm: ``((x - m_hi) - m_lo) *
# scale``; BatchNorm folds it into the shift), so float32 output keeps its accuracy even when
# the mean lies 1e6 standard deviations from zero.
#
# Python validates every argument before calling in here: the kernels trust shapes and do no
# checks beyond those that keep memory safe.

cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport sqrt, isinf, isfinite, fabs, fabsf, ilogb, ldexp, fma, NAN
from libc.stdlib cimport calloc, malloc, free
from libc.stdint cimport uint16_t
from libc.string cimport memcpy, memset

from _common cimport floating, CYNORM_HAVE_OPENMP, CYNORM_BUILD_FLAGS

cnp.import_array()


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(CYNORM_HAVE_OPENMP)


def build_flags():
    """The compiler and linker flags the kernels were built with."""
    return CYNORM_BUILD_FLAGS.decode()


# The core, used by every op.
include "core/policy.pxi"
include "core/moments.pxi"
include "core/columns.pxi"
include "core/features.pxi"
include "core/stores.pxi"
include "core/rescue.pxi"
include "core/drivers.pxi"
include "core/rows.pxi"
include "core/halves.pxi"
include "core/halves_affine.pxi"
include "core/rows_backward.pxi"
include "core/halves_backward.pxi"

# The ops: one file per family (forward and backward).  A new op is a new file here.
include "ops/moments.pxi"
include "ops/layer_norm.pxi"
include "ops/rms_norm.pxi"
include "ops/batch_norm.pxi"
include "ops/batch_norm_backward.pxi"
include "ops/batch_norm_backward_half.pxi"
include "ops/group_norm.pxi"
include "ops/group_norm_half.pxi"
