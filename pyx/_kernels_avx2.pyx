"""cynorm's compiled kernels, built for AVX2 + FMA (source: _kernels_impl.pxi)."""

include "_kernels_impl.pxi"
include "_backward.pxi"

ISA = "avx2"
