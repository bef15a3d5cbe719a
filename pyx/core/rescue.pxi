# Core: the overflow rescue's thresholds.  Statistics beyond these are recomputed on data
# scaled by a power of two (LayerNorm: rescaled_row in ops/layer_norm.pxi; BatchNorm and the
# moments: functional._rescaled on the Python side, which reads FLOAT32_BIG_M2).

# Below this M2 (2^-900) the squares of a float64 row may have lost bits to underflow.
cdef double TINY_M2 = 1.2e-271


# Above this M2 ((FLT_MAX / 2)^2) a float32 deviation x - mean may overflow float32.
cdef double F32_BIG_M2 = 2.89e76


# the same threshold for the Python side (functional._rescaled)
FLOAT32_BIG_M2 = F32_BIG_M2


# Below this variance (4 / FLT_MAX^2) 1 / sqrt(var + eps) overflows float32.
cdef double F32_TINY_VAR = 3.4e-77
