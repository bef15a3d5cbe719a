"""cynorm's compiled kernels, built for AVX-512 (F, CD, DQ, BW, VL) (source: kernels.pxi)."""

include "kernels.pxi"

ISA = "avx512"
