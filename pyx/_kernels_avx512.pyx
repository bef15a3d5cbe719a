"""cynorm's compiled kernels, built for AVX-512 (F, CD, DQ, BW, VL) (source: _kernels_impl.pxi)."""

include "_kernels_impl.pxi"
include "_backward.pxi"

ISA = "avx512"
