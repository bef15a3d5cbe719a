"""The benchmark grid: the ops, their shapes (the quick grid and the full one), the contenders' names, and one case."""
import dataclasses
import importlib.util
import math

import numpy as np


EPS = 1e-5


L3_BYTES = 32 << 20  # the L3 of the reference machine; larger inputs are "far larger than cache"


OPS = {"ln": "LN forward", "rms": "RMSNorm forward", "add_ln": "add + LN",
       "add_rms": "add + RMSNorm", "bn_train": "BN train", "bn_eval": "BN eval",
       "ln_bwd": "LN backward", "rms_bwd": "RMSNorm backward", "bn_bwd_train": "BN backward train",
       "bn_bwd_eval": "BN backward eval", "bn_masked": "BN train masked (N, T, C)",
       "ln_masked": "LN forward masked", "moments": "moments axis=0",
       "scaler": "scaler fit_transform", "gn": "GroupNorm forward", "in": "InstanceNorm forward",
       "gn_bwd": "GroupNorm backward", "in_bwd": "InstanceNorm backward"}


# The row norms' ops (normalized over the last axis, on the LN shapes).
ROW_OPS = ("ln", "rms", "add_ln", "add_rms", "ln_bwd", "rms_bwd", "ln_masked")


# The group norms' ops (per sample: GroupNorm with GROUPS groups, InstanceNorm), on
# GROUP_SHAPES: channels-first (axis 1) and channels-last (axis -1, the shape as it lies).
GROUP_OPS = ("gn", "in", "gn_bwd", "in_bwd")
GROUPS = 32


# The ops whose kernels read and write 16-bit floats: the default grid also times them in
# float16 and bfloat16 (bfloat16 with ml_dtypes installed), on their quick shapes (every shape
# with full=True), against torch's float16 / bfloat16 CPU kernels and the peers that have them.
# (Every op's kernels read and write 16 bits, forward and backward, statistics included.)
HALF_OPS = ("ln", "rms", "add_ln", "add_rms", "bn_train", "bn_eval", "gn", "in", "ln_bwd",
            "rms_bwd", "bn_bwd_train", "bn_bwd_eval", "gn_bwd", "in_bwd")
HALF_DTYPES = ("float16", "bfloat16")


def np_dtype(name):
    """The NumPy dtype of a case's dtype name (bfloat16: ml_dtypes', imported here)."""
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - only bfloat16 cases need it

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def half_dtypes():
    """The 16-bit dtypes this machine can time (bfloat16 needs ml_dtypes)."""
    has_bf16 = importlib.util.find_spec("ml_dtypes") is not None
    return tuple(d for d in HALF_DTYPES if d != "bfloat16" or has_bf16)


# The residual-add forms, also timed against cynorm's own add then normalize (contender
# "cynorm_unfused"): the fused call should take at most 1 / 1.5 of its time on inputs far
# larger than the cache.
FUSED_OPS = ("add_ln", "add_rms")
FUSED_TARGET = 1.5


# Cases held against scikit-learn's StandardScaler instead of NumPy / torch.
SKLEARN_OPS = ("scaler",)


# Padding-mask cases: cynorm with the mask against a reference call, with the target ratio.
#   bn_masked: against BN (cynorm) on the real tokens alone, concatenated: at most 1.10x
#   ln_masked: half the tokens padding, against LN on the whole padded batch: at most 0.60x
MASK_TARGETS = {"bn_masked": 1.10, "ln_masked": 0.60}


# What each masked case is timed against (cynorm's own reference call, and torch, which has no
# mask): named in the table and on the speed-up plot's labels.
MASK_REFERENCES = {"bn_masked": "BN on the real tokens alone",
                   "ln_masked": "LN on the whole padded batch"}


LN_SHAPES = [((5, 10), -1), ((64, 128), -1), ((4096, 768), -1), ((32, 512, 1024), -1),
             ((16384, 4096), -1)]


BN_SHAPES = [((5, 10), 1), ((64, 128), 1), ((4096, 768), 1), ((32, 512, 1024), 1),
             ((16384, 4096), 1), ((32, 256, 1024), 1), ((256, 64, 784), 1), ((64, 512, 768), -1)]


# The quick grid keeps (16384, 4096) for LN forward (the headline case) and BN training
# (the plot of time against size follows both in (N, C)): each takes 10-15 s, NumPy's calls
# taking about a second.  The other ops' large case, (32, 512, 1024), is also twice the L3.
QUICK = {"ln": [(5, 10), (64, 128), (4096, 768), (16384, 4096)],
         "bn_train": [(5, 10), (64, 128), (4096, 768), (32, 256, 1024), (64, 512, 768),
                      (16384, 4096)],
         "bn_eval": [(64, 128), (4096, 768), (32, 512, 1024)],
         "rms": [(64, 128), (4096, 768), (16384, 4096)],
         "add_ln": [(64, 128), (4096, 768), (16384, 4096)],
         "add_rms": [(64, 128), (4096, 768), (16384, 4096)],
         "ln_bwd": [(64, 128), (4096, 768), (32, 512, 1024)],
         "rms_bwd": [(64, 128), (4096, 768), (32, 512, 1024)],
         "bn_bwd_train": [(64, 128), (4096, 768), (32, 256, 1024), (64, 512, 768)],
         "bn_bwd_eval": [(4096, 768)],
         "bn_masked": [(64, 512, 768)],
         "ln_masked": [(64, 512, 768)],
         "moments": [(4096, 768), (100000, 64)],
         "scaler": [(4096, 768), (100000, 64)],
         "gn": [(8, 64, 16, 16), (32, 64, 56, 56), (8, 320, 64, 64), (32, 56, 56, 64)],
         "in": [(32, 64, 56, 56), (32, 56, 56, 64)],
         "gn_bwd": [(32, 64, 56, 56), (32, 56, 56, 64)],
         "in_bwd": [(32, 64, 56, 56)]}


# (8, 320, 64, 64) is a diffusion U-Net block; each shape also channels-last
GROUP_SHAPES = [((8, 64, 16, 16), 1), ((32, 64, 56, 56), 1), ((16, 256, 64, 64), 1),
                ((8, 320, 64, 64), 1), ((8, 16, 16, 64), -1), ((32, 56, 56, 64), -1),
                ((16, 64, 64, 256), -1), ((8, 64, 64, 320), -1)]


MASK_SHAPES = [((16, 128, 64), -1), ((64, 512, 768), -1)]


# statistics of (N, C) tables, the StandardScaler workload
TABLE_SHAPES = [((1000, 20), 1), ((4096, 768), 1), ((100000, 64), 1), ((1000000, 32), 1)]


CONTENDERS = ("cynorm", "cynorm_out", "numpy", "torch")


# How the table, the report and the plots name each contender: one name everywhere.
CONTENDER_NAMES = {"cynorm": "cynorm", "cynorm_out": "cynorm out=", "numpy": "NumPy",
                   "cynorm_unfused": "cynorm add, then norm",
                   "torch": "torch", "onnxruntime": "ONNX Runtime", "jax": "JAX",
                   "sklearn": "scikit-learn"}
# The peers a user would weigh cynorm against: "vs best peer" is against the fastest of them.
PEER_CONTENDERS = ("torch", "onnxruntime", "jax")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str
    axis: int = 1

    @property
    def id(self):
        axis = "" if self.op in ROW_OPS or self.axis == 1 else f"-axis{self.axis}"
        return f"{self.op}-{'x'.join(map(str, self.shape))}{axis}-{self.dtype}"

    @property
    def label(self):
        axis = "" if self.op in ROW_OPS or self.axis == 1 else f" axis={self.axis}"
        return f"{OPS[self.op]} {self.shape}{axis} {self.dtype}"

    @property
    def nbytes(self):
        return math.prod(self.shape) * np_dtype(self.dtype).itemsize

    @property
    def contenders(self):
        """The names ``contenders()`` returns for this case (torch's only when installed)."""
        if self.op in SKLEARN_OPS:
            return ("cynorm", "sklearn")
        if self.op in MASK_TARGETS:
            return ("cynorm", "cynorm_reference", "numpy", "torch")
        if "bwd" in self.op or self.op == "moments":
            return ("cynorm", "numpy", "torch")
        if self.op in FUSED_OPS:
            return ("cynorm", "cynorm_out", "numpy", "cynorm_unfused", "torch")
        return CONTENDERS

    @property
    def size_class(self):
        if math.prod(self.shape) < 100_000:
            return "small"
        return "medium" if self.nbytes <= L3_BYTES else "large"

    @property
    def bytes_moved(self):
        """Least traffic to memory: LN, RMSNorm and BN eval read x and write y; the residual
        forms read x and the residual and write h and y; BN training must read x
        for the statistics before it can write anything, so twice once x outgrows the cache.
        Backward reads x and grad_out and writes dx; BN backward needs its sums first, so it
        reads both twice once they outgrow the cache (LN's sums are per row, in cache)."""
        big = self.nbytes > L3_BYTES
        if self.op in ("ln_bwd", "rms_bwd", "gn_bwd", "in_bwd"):  # sums per sample, in cache
            return 3 * self.nbytes
        if self.op in FUSED_OPS:  # x and residual read, h and y written
            return 4 * self.nbytes
        if self.op.startswith("bn_bwd"):
            return (5 if big else 3) * self.nbytes
        if self.op == "moments":
            return self.nbytes  # one read, nothing written
        if self.op in SKLEARN_OPS:  # statistics (one read), then transform (read and write)
            return 3 * self.nbytes
        reads = 2 if self.op == "bn_train" and big else 1
        return (reads + 1) * self.nbytes


def cases(full=False, ops=None, dtypes=None, sizes=None):
    """The benchmark grid: the quick subset, or with full=True every shape and dtype (with no
    dtypes given, HALF_OPS also in float16 and bfloat16)."""
    ops = list(ops or OPS)
    halves = half_dtypes() if not dtypes else ()
    dtypes = list(dtypes or (["float32", "float64"] if full else ["float32"]))
    out = []
    for op in ops:
        if op in SKLEARN_OPS and importlib.util.find_spec("sklearn") is None:
            continue  # scikit-learn is not installed: nothing to hold cynorm against
        if op in MASK_TARGETS:
            grid = MASK_SHAPES
        elif op in ("moments",) + SKLEARN_OPS:
            grid = TABLE_SHAPES
        else:
            grid = LN_SHAPES if op in ROW_OPS else GROUP_SHAPES if op in GROUP_OPS \
                else BN_SHAPES
        for shape, axis in grid:
            if not full and shape not in QUICK[op]:
                continue
            for dtype in dtypes + (list(halves) if op in HALF_OPS else []):
                case = Case(op, shape, dtype, axis)
                if sizes and case.size_class not in sizes:
                    continue
                out.append(case)
    return out
