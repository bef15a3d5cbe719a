"""Speed of cynorm against the NumPy expression a user would write and against torch on CPU.

One place for the cases and the contenders, used by ``cynorm bench`` (``python -m cynorm
bench``) and by the pytest-benchmark suite in ``benchmarks/``.  Timings are medians of
interleaved rounds (cynorm, NumPy, torch, cynorm, ...), so that drift of the machine hits every
contender alike.  Inputs are reused between calls: cases that fit the L3 cache are cache figures
(each of their samples follows one untimed call of the same contender).

Each medium and large case is also set against a memory roof timed in the same interleaved
rounds: a same-size copy into a preallocated array (NumPy, and torch with all threads when
present; the faster counts) gives bytes per second; the case's bytes moved (LN: one read and one
write; BN training: two reads and one write once x outgrows the cache; BN eval: one read and one
write) divided by it is the roof time.  For BN training on inputs only a little larger than the
cache, part of the second read still comes from cache, so cynorm can beat that model.
"""
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

EPS = 1e-5
L3_BYTES = 32 << 20  # the L3 of the reference machine; larger inputs are "far larger than cache"
OPS = {"ln": "LN forward", "bn_train": "BN train", "bn_eval": "BN eval",
       "ln_bwd": "LN backward", "bn_bwd_train": "BN backward train",
       "bn_bwd_eval": "BN backward eval", "bn_masked": "BN train masked (N, T, C)",
       "ln_masked": "LN forward masked", "moments": "moments axis=0",
       "scaler": "scaler fit_transform"}
# Cases held against scikit-learn's StandardScaler instead of NumPy / torch.
SKLEARN_OPS = ("scaler",)
# Padding-mask cases: cynorm with the mask against a reference call, with the target ratio.
#   bn_masked: against BN (cynorm) on the real tokens alone, concatenated: at most 1.10x
#   ln_masked: half the tokens padding, against LN on the whole padded batch: at most 0.60x
MASK_TARGETS = {"bn_masked": 1.10, "ln_masked": 0.60}
LN_SHAPES = [((5, 10), -1), ((64, 128), -1), ((4096, 768), -1), ((32, 512, 1024), -1),
             ((16384, 4096), -1)]
BN_SHAPES = [((5, 10), 1), ((64, 128), 1), ((4096, 768), 1), ((32, 512, 1024), 1),
             ((16384, 4096), 1), ((32, 256, 1024), 1), ((256, 64, 784), 1), ((64, 512, 768), -1)]
# The quick grid keeps (16384, 4096) for LN forward (the issue's headline case) and BN training
# (the plot of time against size follows both in (N, C)): each takes 10-15 s, NumPy's calls
# taking about a second.  The other ops' large case, (32, 512, 1024), is also twice the L3.
QUICK = {"ln": [(5, 10), (64, 128), (4096, 768), (16384, 4096)],
         "bn_train": [(5, 10), (64, 128), (4096, 768), (32, 256, 1024), (64, 512, 768),
                      (16384, 4096)],
         "bn_eval": [(64, 128), (4096, 768), (32, 512, 1024)],
         "ln_bwd": [(64, 128), (4096, 768), (32, 512, 1024)],
         "bn_bwd_train": [(64, 128), (4096, 768), (32, 256, 1024), (64, 512, 768)],
         "bn_bwd_eval": [(4096, 768)],
         "bn_masked": [(64, 512, 768)],
         "ln_masked": [(64, 512, 768)],
         "moments": [(4096, 768), (100000, 64)],
         "scaler": [(4096, 768), (100000, 64)]}
MASK_SHAPES = [((16, 128, 64), -1), ((64, 512, 768), -1)]
# statistics of (N, C) tables, the StandardScaler workload
TABLE_SHAPES = [((1000, 20), 1), ((4096, 768), 1), ((100000, 64), 1), ((1000000, 32), 1)]
CONTENDERS = ("cynorm", "cynorm_out", "numpy", "torch")
# How the table, the report and the plots name each contender: one name everywhere.
CONTENDER_NAMES = {"cynorm": "cynorm", "cynorm_out": "cynorm out=", "numpy": "NumPy",
                   "torch": "torch"}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    dtype: str
    axis: int = 1

    @property
    def id(self):
        axis = "" if self.op.startswith("ln") or self.axis == 1 else f"-axis{self.axis}"
        return f"{self.op}-{'x'.join(map(str, self.shape))}{axis}-{self.dtype}"

    @property
    def label(self):
        axis = "" if self.op.startswith("ln") or self.axis == 1 else f" axis={self.axis}"
        return f"{OPS[self.op]} {self.shape}{axis} {self.dtype}"

    @property
    def nbytes(self):
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def contenders(self):
        """The names ``contenders()`` returns for this case (torch's only when installed)."""
        if self.op in SKLEARN_OPS:
            return ("cynorm", "sklearn")
        if self.op in MASK_TARGETS:
            return ("cynorm", "cynorm_reference", "numpy", "torch")
        if "bwd" in self.op or self.op == "moments":
            return ("cynorm", "numpy", "torch")
        return CONTENDERS

    @property
    def size_class(self):
        if math.prod(self.shape) < 100_000:
            return "small"
        return "medium" if self.nbytes <= L3_BYTES else "large"

    @property
    def bytes_moved(self):
        """Least traffic to memory: LN and BN eval read x and write y; BN training must read x
        for the statistics before it can write anything, so twice once x outgrows the cache.
        Backward reads x and grad_out and writes dx; BN backward needs its sums first, so it
        reads both twice once they outgrow the cache (LN's sums are per row, in cache)."""
        big = self.nbytes > L3_BYTES
        if self.op in ("ln_bwd",):
            return 3 * self.nbytes
        if self.op.startswith("bn_bwd"):
            return (5 if big else 3) * self.nbytes
        if self.op == "moments":
            return self.nbytes  # one read, nothing written
        if self.op in SKLEARN_OPS:  # statistics (one read), then transform (read and write)
            return 3 * self.nbytes
        reads = 2 if self.op == "bn_train" and big else 1
        return (reads + 1) * self.nbytes


def cases(full=False, ops=None, dtypes=None, sizes=None):
    """The benchmark grid: the quick subset, or with full=True every shape and dtype."""
    ops = list(ops or OPS)
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
            grid = LN_SHAPES if op.startswith("ln") else BN_SHAPES
        for shape, axis in grid:
            if not full and shape not in QUICK[op]:
                continue
            for dtype in dtypes:
                case = Case(op, shape, dtype, axis)
                if sizes and case.size_class not in sizes:
                    continue
                out.append(case)
    return out


def _numpy_bn_axes(case):
    axis = case.axis % len(case.shape)
    return tuple(i for i in range(len(case.shape)) if i != axis), axis


def _bn_setup(case, rng):
    """(reduced axes, feature axis, C, weight, bias, running_mean, running_var) of a BN case."""
    axes, axis = _numpy_bn_axes(case)
    C = case.shape[axis]
    w = rng.uniform(0.5, 2, C).astype(case.dtype)
    b = rng.standard_normal(C).astype(case.dtype)
    return axes, axis, C, w, b, np.zeros(C, case.dtype), np.ones(C, case.dtype)


def contenders(case, torch=None, seed=0):
    """{name: zero-argument callable} for one case, on fresh random data (not zeros)."""
    import cynorm

    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(case.shape, dtype=np.float32)).astype(case.dtype)
    if case.op.endswith("bwd") or "_bwd_" in case.op:
        return _backward_contenders(case, x, rng, torch)
    if case.op in MASK_TARGETS:
        return _mask_contenders(case, x, rng, torch)
    if case.op in ("moments",) + SKLEARN_OPS:
        return _table_contenders(case, x, torch)
    out = np.empty_like(x)
    fns = {}
    if case.op == "ln":
        D = case.shape[-1]
        w = rng.uniform(0.5, 2, D).astype(case.dtype)
        b = rng.standard_normal(D).astype(case.dtype)
        fns["cynorm"] = lambda: cynorm.layer_norm(x, D, w, b, EPS)
        fns["cynorm_out"] = lambda: cynorm.layer_norm(x, D, w, b, EPS, out=out)

        def numpy_ln():
            m = x.mean(axis=-1, keepdims=True)
            v = x.var(axis=-1, keepdims=True)
            return (x - m) / np.sqrt(v + EPS) * w + b

        fns["numpy"] = numpy_ln
        if torch is not None:
            tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
            F = torch.nn.functional

            def torch_ln():
                with torch.no_grad():
                    return F.layer_norm(tx, (D,), tw, tb, EPS)

            fns["torch"] = torch_ln
        return fns

    axes, axis, C, w, b, rm, rv = _bn_setup(case, rng)
    training = case.op == "bn_train"
    bshape = [1] * len(case.shape)
    bshape[axis] = C
    fns["cynorm"] = lambda: cynorm.batch_norm(x, rm, rv, w, b, training, 0.1, EPS, axis=case.axis)
    fns["cynorm_out"] = lambda: cynorm.batch_norm(x, rm, rv, w, b, training, 0.1, EPS,
                                                  axis=case.axis, out=out)
    n = x.size // C
    np_rm, np_rv = rm.copy(), rv.copy()

    def numpy_bn():
        if training:
            m = x.mean(axis=axes)
            v = x.var(axis=axes)
            np_rm[...] = 0.9 * np_rm + 0.1 * m
            np_rv[...] = 0.9 * np_rv + 0.1 * v * (n / (n - 1))
        else:
            m, v = np_rm, np_rv
        return (x - m.reshape(bshape)) / np.sqrt(v.reshape(bshape) + EPS) * w.reshape(bshape) \
            + b.reshape(bshape)

    fns["numpy"] = numpy_bn
    if torch is not None:
        tx = torch.from_numpy(x)
        if axis != 1:  # torch wants the channel on axis 1: a permuted view, as a user would
            tx = tx.movedim(axis, 1)
        tw, tb, trm, trv = (torch.from_numpy(a.copy()) for a in (w, b, rm, rv))
        F = torch.nn.functional

        def torch_bn():
            with torch.no_grad():
                y = F.batch_norm(tx, trm, trv, tw, tb, training, 0.1, EPS)
                return y.movedim(1, axis) if axis != 1 else y

        fns["torch"] = torch_bn
    return fns


def _backward_contenders(case, x, rng, torch):
    import cynorm

    g = rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype)
    fns = {}
    if case.op == "ln_bwd":
        D = case.shape[-1]
        w = rng.uniform(0.5, 2, D).astype(case.dtype)
        b = rng.standard_normal(D).astype(case.dtype)
        _, mean, rstd = cynorm.layer_norm(x, D, w, b, EPS, return_stats=True)
        fns["cynorm"] = lambda: cynorm.layer_norm_backward(g, x, mean, rstd, D, w, b)
        m, r = mean.astype(case.dtype), rstd.astype(case.dtype)
        axes = tuple(range(x.ndim - 1))

        def numpy_ln_bwd():
            xh = (x - m) * r
            gw = g * w
            dx = r * (gw - gw.mean(-1, keepdims=True) - xh * (gw * xh).mean(-1, keepdims=True))
            return dx, (g * xh).sum(axis=axes), g.sum(axis=axes)

        fns["numpy"] = numpy_ln_bwd
        if torch is not None:
            tx, tg, tw, tb = (torch.from_numpy(a) for a in (x, g, w, b))
            with torch.no_grad():
                _, tm, tr = torch.ops.aten.native_layer_norm(tx, [D], tw, tb, EPS)
            op = torch.ops.aten.native_layer_norm_backward

            def torch_ln_bwd():
                with torch.no_grad():
                    return op(tg, tx, [D], tm, tr, tw, tb, [True, True, True])

            fns["torch"] = torch_ln_bwd
        return fns

    axes, axis, C, w, b, rm, rv = _bn_setup(case, rng)
    training = case.op == "bn_bwd_train"
    _, mean, invstd = cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training, 0.1, EPS,
                                        axis=case.axis, return_stats=True)
    fns["cynorm"] = lambda: cynorm.batch_norm_backward(g, x, mean, invstd, w, training,
                                                       axis=case.axis, bias=b)
    bshape = [1] * len(case.shape)
    bshape[axis] = C
    m, inv, wb = (a.astype(case.dtype).reshape(bshape) for a in (mean, invstd, w))
    n = x.size // C

    def numpy_bn_bwd():
        xh = (x - m) * inv
        sg = g.sum(axis=axes)
        sgx = (g * xh).sum(axis=axes)
        if training:
            dx = wb * inv * (g - sg.reshape(bshape) / n - xh * sgx.reshape(bshape) / n)
        else:
            dx = g * (wb * inv)
        return dx, sgx, sg

    fns["numpy"] = numpy_bn_bwd
    if torch is not None:
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
        if axis != 1:
            tx, tg = tx.movedim(axis, 1), tg.movedim(axis, 1)
        tw, trm, trv = (torch.from_numpy(a) for a in (w, rm, rv))
        tmean = torch.from_numpy(mean.astype(case.dtype))
        tinv = torch.from_numpy(invstd.astype(case.dtype))
        op = torch.ops.aten.native_batch_norm_backward

        def torch_bn_bwd():
            with torch.no_grad():
                dx, dw, db = op(tg, tx, tw, trm, trv, tmean, tinv, training, EPS,
                                [True, True, True])
                return (dx.movedim(1, axis) if axis != 1 else dx), dw, db

        fns["torch"] = torch_bn_bwd
    return fns


def _mask_contenders(case, x, rng, torch):
    """cynorm with a padding mask, the reference call it is held against, NumPy and torch."""
    import cynorm

    N, T, C = case.shape
    if case.op == "ln_masked":
        lengths = np.full(N, T // 2)  # half the tokens are padding
    else:
        lengths = rng.integers(1, T + 1, N)
    mask = np.arange(T) < lengths[:, None]
    real = np.ascontiguousarray(x[mask])
    fns = {}
    if case.op == "ln_masked":
        fns["cynorm"] = lambda: cynorm.layer_norm(x, C, lengths=lengths)
        fns["cynorm_reference"] = lambda: cynorm.layer_norm(x, C)

        def numpy_ln_masked():
            y = np.zeros_like(x)
            r = x[mask]
            y[mask] = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + EPS)
            return y

        fns["numpy"] = numpy_ln_masked
        if torch is not None:
            tx = torch.from_numpy(x)

            def torch_ln():  # torch has no mask: the whole padded batch
                with torch.no_grad():
                    return torch.nn.functional.layer_norm(tx, (C,), eps=EPS)

            fns["torch"] = torch_ln
        return fns
    rm, rv = np.zeros(C, case.dtype), np.ones(C, case.dtype)
    fns["cynorm"] = lambda: cynorm.batch_norm(x, rm, rv, training=True, axis=-1, lengths=lengths)
    fns["cynorm_reference"] = lambda: cynorm.batch_norm(real, rm, rv, training=True)

    def numpy_bn_masked():
        y = np.zeros_like(x)
        r = x[mask]
        y[mask] = (r - r.mean(0)) / np.sqrt(r.var(0) + EPS)
        return y

    fns["numpy"] = numpy_bn_masked
    if torch is not None:
        treal = torch.from_numpy(real)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())

        def torch_bn_real():  # torch has no mask: BN on the real tokens alone
            with torch.no_grad():
                return torch.nn.functional.batch_norm(treal, trm, trv, training=True, eps=EPS)

        fns["torch"] = torch_bn_real
    return fns


def _table_contenders(case, x, torch):
    """Statistics of an (N, C) table: moments against NumPy and torch; BatchNormScaler
    (eps=0: StandardScaler's arithmetic) against scikit-learn's StandardScaler."""
    import cynorm

    fns = {}
    if case.op == "moments":
        fns["cynorm"] = lambda: cynorm.moments(x, 0)
        fns["numpy"] = lambda: (x.mean(axis=0), x.var(axis=0))
        if torch is not None:
            tx = torch.from_numpy(x)
            fns["torch"] = lambda: torch.var_mean(tx, 0, correction=0)
        return fns
    from cynorm.sklearn import BatchNormScaler

    fns["cynorm"] = lambda: BatchNormScaler(eps=0.0).fit_transform(x)
    try:
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return fns
    fns["sklearn"] = lambda: StandardScaler().fit_transform(x)
    return fns


def sklearn_table(results):
    """cynorm's BatchNormScaler against scikit-learn's StandardScaler."""
    rows = [r for r in results if r["op"] in SKLEARN_OPS]
    if not rows:
        return []
    lines = ["| case | cynorm BatchNormScaler | sklearn StandardScaler | vs sklearn | roof |",
             "|---|---|---|---|---|"]
    for r in rows:
        t = r["times"]
        sk = t.get("sklearn")
        lines.append(f"| {r['label']} | {_fmt(t['cynorm'])} | {_fmt(sk)} | "
                     + (f"{sk / t['cynorm']:.2f}× | " if sk else "— | ")
                     + f"{_fmt(r.get('roof'))} |")
    return lines


# What each masked case is timed against (cynorm's own reference call, and torch, which has no
# mask): named in the table and on the speed-up plot's labels.
MASK_REFERENCES = {"bn_masked": "BN on the real tokens alone",
                   "ln_masked": "LN on the whole padded batch"}


def mask_table(results):
    """The padding-mask cases: cynorm with the mask against its reference call and target,
    whether the target was met, and a note on what a miss means."""
    rows = [r for r in results if r["op"] in MASK_TARGETS]
    if not rows:
        return []
    lines = ["| case | cynorm with mask | reference | ratio | target | met | NumPy (mask) | "
             "torch (no mask) |", "|---|---|---|---|---|---|---|---|"]
    missed = False
    for r in rows:
        t = r["times"]
        ratio = t["cynorm"] / t["cynorm_reference"]
        target = MASK_TARGETS[r["op"]]
        met = "yes" if ratio <= target else "**no**"
        missed |= ratio > target
        lines.append(f"| {r['label']} | {_fmt(t['cynorm'])} | {_fmt(t['cynorm_reference'])} "
                     f"({MASK_REFERENCES[r['op']]}) | {ratio:.2f} | ≤ {target:.2f} | {met} | "
                     f"{_fmt(t.get('numpy'))} | {_fmt(t.get('torch'))} |")
    lines += ["", "ratio: cynorm's time with the mask / its reference call's time (lower is "
              "better); target: the most it should be. torch has no mask: its column times "
              "the same reference (BN on the real tokens, LN on the whole padded batch)."]
    if missed:
        lines.append("A **no** is a real miss, shown as measured: there the masked path costs "
                     "more than its target over the reference (BN's reference runs on the "
                     "real tokens gathered beforehand, the gather left out of its time). "
                     "benchmarks/RESULTS.md follows these cases run by run.")
    return lines


def copy_contenders(nbytes, torch=None):
    """Same-size copies into a preallocated array (NumPy, 1 thread; torch, all threads): the
    memory roof, timed in the same interleaved rounds as the case itself."""
    src = np.random.default_rng(1).standard_normal(max(1, nbytes // 8))
    dst = np.empty_like(src)
    fns = {"copy_numpy": lambda: np.copyto(dst, src)}
    if torch is not None:
        tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
        fns["copy_torch"] = lambda: tdst.copy_(tsrc)
    return fns


def _calibrate(fn, target=2e-3):
    """(calls per sample so that one sample lasts about ``target`` seconds, at least one;
    seconds one such sample takes)."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    k = max(1, min(10_000, int(target / dt)))
    return k, k * dt


def timed(fns, rounds=15, max_seconds=None, warm=False, max_repeats=1):
    """Median seconds per call of each callable, measured in interleaved rounds.

    warm: one untimed call before each sample, so that a case that fits the cache is timed
    with its inputs in cache, whichever contender ran before it (without it, the first
    contender of each round met a cache just emptied by the last one, the roof copies).

    max_repeats: a contender whose sample takes at most a quarter of the slowest one's gets
    up to this many samples per round, taken in sub-rounds that interleave as well.  On large
    inputs NumPy's call can take seconds, so the time budget allows only three rounds; without
    repeats the medians of the fast contenders (and of the roof copies) rested on three
    samples, and one disturbed stretch of the machine moved them."""
    numbers, cost = {}, {}
    for name, fn in fns.items():
        fn()  # warm up: first-touch, caches, thread start-up
        numbers[name], cost[name] = _calibrate(fn)
    slowest = max(cost.values())
    repeats = {name: max(1, min(max_repeats, int(slowest / (4 * c)))) for name, c in cost.items()}
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for sub in range(max(repeats.values())):
            for name, fn in fns.items():
                if sub >= repeats[name]:
                    continue
                k = numbers[name]
                if warm:
                    fn()
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) / k)
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {name: float(np.median(s)) for name, s in samples.items()}


def machine_info(threads):
    import cynorm
    from cynorm._config import config_info

    info = config_info()
    info["threads"] = threads
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["cpu_count"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    info["cynorm_threads_default"] = cynorm.get_num_threads()
    return info


def run(case_list, threads=None, rounds=15, use_torch=True, progress=True, max_seconds=8.0):
    """Time every case; returns (machine info, list of result dicts)."""
    import cynorm

    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = threads or cynorm.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    results = []
    with cynorm.num_threads(threads):
        for i, case in enumerate(case_list, 1):
            if progress:
                bar = "#" * int(20 * i / len(case_list))
                print(f"\r[{bar:<20}] {i}/{len(case_list)} {case.label:<45}", end="",
                      file=sys.stderr, flush=True)
            fns = contenders(case, torch)
            if case.size_class != "small":
                fns.update(copy_contenders(case.nbytes, torch))
            r = rounds if case.size_class != "large" else max(5, rounds // 3)
            large = case.size_class == "large"
            times = timed(fns, rounds=r, max_seconds=max_seconds, warm=not large,
                          max_repeats=5 if large else 1)
            copies = {k: times.pop(k) for k in list(times) if k.startswith("copy_")}
            row = {"case": case.id, "label": case.label, "op": case.op, "shape": list(case.shape),
                   "dtype": case.dtype, "axis": case.axis, "size_class": case.size_class,
                   "nbytes": case.nbytes, "times": times, "copy_times": copies}
            if copies:
                row["bandwidth"] = 2 * case.nbytes / min(copies.values())
                row["roof"] = case.bytes_moved / row["bandwidth"]
            results.append(row)
            del fns
    if progress:
        print(file=sys.stderr)
    return machine_info(threads), results


def _fmt(seconds):
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.2f} ms"


def table(results):
    """The report table as Markdown lines, with the notes that say how to read it."""
    lines = ["| case | cynorm | cynorm out= | NumPy | torch | vs NumPy | vs torch | roof | "
             "of roof |",
             "|---|---|---|---|---|---|---|---|---|"]
    above = False
    for r in results:
        if r["op"] in MASK_TARGETS or r["op"] in SKLEARN_OPS:
            continue
        t = r["times"]
        c, co, n, tt = (t.get(k) for k in CONTENDERS)
        roof = r.get("roof")
        best = co or c  # backward has no out=: its own time against the roof
        if roof:
            share = roof / best
            above |= share > 1.0
        lines.append(
            f"| {r['label']} | {_fmt(c)} | {_fmt(co)} | {_fmt(n)} | {_fmt(tt)} | "
            f"{n / c:.2f}× | " + (f"{tt / c:.2f}× | " if tt else "— | ")
            + (f"{_fmt(roof)} | {share:.2f}{'*' if share > 1.0 else ''} |" if roof
               else "— | — |")
        )
    lines += ["", "vs NumPy, vs torch: their time / cynorm's (above 1: cynorm is faster). roof: "
              "the time a same-size copy, timed in the same rounds, takes to move the case's "
              "bytes (medium and large cases only). of roof: roof / cynorm out= (backward, "
              "which has no out=: roof / cynorm); 1.00 is the copy's speed."]
    if above:
        lines.append("* above 1: faster than that copy. The copy is a measured floor, not a "
                     "law: near the cache's size part of the data is still cached (BN "
                     "training's second read above all), and the copy's own loop can be "
                     "slower than a kernel's streamed read and write. Read 0.8-1.3 as at the "
                     "roof.")
    return lines


def summary(results):
    """Speed-ups: geometric means and the worst case against each contender."""
    lines = []
    for other in ("numpy", "torch"):
        ratios = [(r["times"][other] / r["times"]["cynorm"], r["label"]) for r in results
                  if r["times"].get(other) and r["op"] not in MASK_TARGETS
                  and r["op"] not in SKLEARN_OPS]
        if ratios:
            gm = math.exp(sum(math.log(v) for v, _ in ratios) / len(ratios))
            worst = min(ratios)
            lines.append(f"- against {'NumPy' if other == 'numpy' else 'torch'}: geometric mean "
                         f"{gm:.2f}×, slowest case {worst[0]:.2f}× ({worst[1]})")
    return lines


def write_report(info, results, folder):
    """report.md, results.json and (with matplotlib) speedup.png and time_vs_size.png."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)
    plots = _plots(results, folder)
    md = [f"# cynorm benchmark report ({info['date']})", "",
          "Medians of interleaved rounds, seconds per call with a fresh output unless `out=`. "
          "Speed-ups are NumPy or torch time divided by cynorm time (> 1: cynorm is faster). "
          "The roof is the time a same-size copy into a preallocated array takes to move the "
          "case's bytes; `of roof` (roof / cynorm out=) is 1.0 at the roof. Small and medium inputs are "
          "reused between calls: cache figures. On large inputs a contender whose call takes "
          "at most a quarter of the slowest one's is sampled up to 5 times per round.", "",
          "## Machine", ""]
    for key in ("cpu", "cpu_count", "threads", "torch_threads", "openmp", "isa", "cynorm",
                "numpy", "torch", "python", "platform", "build_flags"):
        md.append(f"- {key}: {info.get(key)}")
    md += ["", "## Results", ""] + table(results) + ["", "## Summary", ""] + summary(results)
    masks = mask_table(results)
    if masks:
        md += ["", "## Padding masks", ""] + masks
    scalers = sklearn_table(results)
    if scalers:
        md += ["", "## scikit-learn", ""] + scalers
    if plots:
        md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    with open(os.path.join(folder, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return os.path.join(folder, "report.md")


def _plots(results, folder):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    # masked cases: torch has no mask, so its bar is against torch on the reference input
    labels = [r["label"] + (f"  [torch: no mask, {MASK_REFERENCES[r['op']]}]"
                            if r["op"] in MASK_REFERENCES else "") for r in results]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(results) + 1.8))
    ypos = np.arange(len(results))
    series = [("numpy", "NumPy", "tab:blue"), ("torch", "torch", "tab:orange")]
    if any(r["times"].get("sklearn") for r in results):
        series.append(("sklearn", "scikit-learn", "tab:green"))
    height = 0.8 / len(series)
    every = []
    for k, (other, name, color) in enumerate(series):
        vals = [r["times"][other] / r["times"]["cynorm"] if r["times"].get(other) else np.nan
                for r in results]
        bars = ax.barh(ypos + (k - (len(series) - 1) / 2) * height, vals, height=height,
                       color=color, label=f"vs {name}")
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}×" for v in vals],
                     fontsize=6, padding=2)
        every += [v for v in vals if not np.isnan(v)]
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    if every:  # ticks at 1, 2, 5 of each decade, labelled as ratios
        lo, hi = min(every + [1.0]) / 1.5, max(every + [1.0]) * 2.5
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)),
                                              math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)
                 if lo <= m * 10.0 ** e <= hi]
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.minorticks_off()
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of cynorm (other's time / cynorm's time; above 1: cynorm is "
                  "faster), log scale")
    ax.legend(loc="lower right")
    ax.set_title("cynorm speed-up per case (masked cases: torch has no mask, see the labels)")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "speedup.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    made.append("speedup.png")

    groups = {}
    for r in results:
        if r["op"] == "ln" or (r["op"] == "bn_train" and r["axis"] == 1 and len(r["shape"]) == 2):
            groups.setdefault((r["op"], r["dtype"]), []).append(r)
    groups = {k: sorted(v, key=lambda r: r["nbytes"]) for k, v in groups.items() if len(v) > 1}
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
        for ax, ((op, dtype), rows) in zip(axes[0], groups.items()):
            sizes = [r["nbytes"] for r in rows]
            for name, style in (("cynorm", "o-"), ("cynorm_out", "o--"), ("numpy", "s-"),
                                ("torch", "^-")):
                ts = [r["times"].get(name, np.nan) or np.nan for r in rows]
                ax.plot(sizes, ts, style, label=CONTENDER_NAMES[name])
            roofs = [r.get("roof", np.nan) for r in rows]
            ax.plot(sizes, roofs, "k:", label="memory roof")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("input bytes")
            ax.set_ylabel("seconds per call")
            ax.set_title(f"{OPS[op]} {dtype}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "time_vs_size.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append("time_vs_size.png")
    return made


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="cynorm bench", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every shape in float32 and float64 (default: the quick grid, float32)")
    p.add_argument("--ops", default=None,
                   help="comma list of " + ", ".join(OPS) + " (default: all of them)")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, float64 (default: float32; with --full both)")
    p.add_argument("--sizes", default=None,
                   help="comma list of small, medium, large (default: all three)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for cynorm and torch (default: cynorm's own count, from "
                        "OMP_NUM_THREADS or the CPUs the process may use)")
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds per case (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out (default: timed "
                   "when installed)")
    p.add_argument("--out", default="cynorm-bench-report",
                   help="report folder (default: %(default)s)")
    args = p.parse_args(argv)

    def split(v):
        return [s.strip() for s in v.split(",")] if v else None

    grid = cases(args.full, split(args.ops), split(args.dtype), split(args.sizes))
    if not grid:
        p.error("no case matches the options")
    info, results = run(grid, args.threads, args.rounds, not args.no_torch)
    print(f"cynorm {info['cynorm']} ({info['isa']} kernels, OpenMP "
          f"{'on' if info['openmp'] else 'off'}), {info['threads']} threads, torch "
          f"{info['torch'] or 'not installed'}, NumPy {info['numpy']}, CPU {info['cpu']}\n")
    print("\n".join(table(results)))
    print("\n" + "\n".join(summary(results)))
    masks = mask_table(results)
    if masks:
        print("\nPadding masks:\n" + "\n".join(masks))
    scalers = sklearn_table(results)
    if scalers:
        print("\nscikit-learn:\n" + "\n".join(scalers))
    path = write_report(info, results, args.out)
    print(f"\nreport: {path}")
    return 0
