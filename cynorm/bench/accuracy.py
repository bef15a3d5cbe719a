"""Accuracy beside speed: each contender's max error on float32 data far from zero.

For every op of the run that has one here, the contenders of a float32 case run once on data
whose mean lies OFFSET standard deviations from zero, and their first output (y, or dx for
backward) is set against the NumPy expression of the same op in float64 on the same values
(the parameters are drawn as float32, so both dtypes hold the same ones).  The speed cases sit
near zero, where every contender is accurate; this is where the formulas differ (ONNX Runtime's
LayerNorm takes E[x²] - E[x]² in float, which users see turn into NaN far from zero).
"""
import numpy as np

from .contenders import contenders
from .grid import GROUP_OPS, ROW_OPS, Case

OFFSET = 1e4
SHAPE = (512, 768)
GROUP_SHAPE = (8, 64, 32, 32)  # the group norms' case: (N, C, H, W)
# ops whose output does not grow with the offset (BN eval's running statistics sit at 0 and 1,
# so its output would be about the offset itself: nothing to compare there)
# (not the residual forms: their h is rounded to float32 by definition, as torch's add)
OPS = ("ln", "rms", "bn_train", "ln_bwd", "rms_bwd", "bn_bwd_train", "gn", "in", "gn_bwd",
       "in_bwd")


def _first(value):
    """The first array a contender returns, as float64 NumPy."""
    if isinstance(value, (list, tuple)):
        value = value[0]
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().numpy()
    return np.asarray(value, dtype=np.float64)


def accuracy(ops, torch=None, peers=None, seed=7):
    """{op: {contender: max abs error, or None where NaN or inf came out}} for the ops of
    ``ops`` that have an accuracy case."""
    out = {}
    for op in ops:
        if op not in OPS:
            continue
        axis = -1 if op in ROW_OPS else 1
        shape = GROUP_SHAPE if op in GROUP_OPS else SHAPE
        rng = np.random.default_rng(seed)
        x32 = (OFFSET + rng.standard_normal(shape)).astype(np.float32)
        reference = contenders(Case(op, shape, "float64", axis), None, seed=seed,
                               x=x32.astype(np.float64))["numpy"]
        want = _first(reference())
        errors = {}
        for name, fn in contenders(Case(op, shape, "float32", axis), torch, seed=seed,
                                   peers=peers, x=x32).items():
            if name == "cynorm_out":
                continue
            got = _first(fn())
            errors[name] = float(np.max(np.abs(got - want))) if np.isfinite(got).all() else None
        out[op] = errors
    return out
