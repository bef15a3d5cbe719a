# Stub of cynorm._kernels_avx512: cynorm._kernels built for avx512 (see _kernels.pyi).
from cynorm._kernels import *  # noqa: F403
from cynorm._kernels import ISA as ISA
from cynorm._kernels import __test__ as __test__
