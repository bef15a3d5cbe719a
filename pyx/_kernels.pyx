"""cynorm's compiled kernels, built for the platform's baseline instruction set (source: kernels.pxi)."""

include "kernels.pxi"

ISA = "baseline"
