"""cynorm's compiled kernels, built for AVX2 + FMA (source: kernels.pxi)."""

include "kernels.pxi"

ISA = "avx2"
