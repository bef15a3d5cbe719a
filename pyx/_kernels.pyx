"""cynorm's compiled kernels, built for the platform's baseline instruction set (source: _kernels_impl.pxi)."""

include "_kernels_impl.pxi"
include "_backward.pxi"

ISA = "baseline"
