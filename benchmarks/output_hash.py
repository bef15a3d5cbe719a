"""A hash of cynorm's outputs over a grid of calls: the check that a restructure changed no bit.

    python benchmarks/output_hash.py > new.json        # for every kernels build this CPU runs
    python benchmarks/output_hash.py --compare old.json new.json

Each entry is the SHA-256 of every array one call returns, for every public function (forward
and backward, with and without the affine parameters, masks, out=) over shapes that take each
kernel path (row and column BatchNorm layouts, vector remainders, streamed outputs), both
dtypes, several layouts, 1 and 2 threads, and each ISA build (a subprocess per build, forced
with CYNORM_ISA).  The data are drawn from a fixed seed, with offsets that hurt.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

SHAPES_LN = [((7, 13), 13), ((64, 128), 128), ((33, 5, 40), (5, 40)), ((513, 1031), 1031),
             ((2100, 4096), 4096)]
SHAPES_BN = [((9, 13), 1), ((300, 70), 1), ((8, 6, 70), 1), ((4, 5, 9, 11), 1),
             ((6, 50, 33), -1), ((3, 7, 5, 3), 2), ((3000, 2000), 1), ((16, 64, 4100), 1)]
MASKED = [(4, 9, 24), (8, 300, 256)]


SHAPES_GN = [((4, 64, 300), 32, 1), ((4, 300, 64), 32, -1), ((2, 12, 9, 7), 3, 1),
             ((2, 9, 7, 12), 4, -1), ((3, 40, 70), 7, -1)]


def _data(rng, shape, dtype, offset):
    return (offset + rng.standard_normal(shape) * 3.0).astype(dtype)


def _layouts(x):
    yield "c", x
    yield "fortran", np.asfortranarray(x)
    if x.ndim >= 2 and x.shape[-1] > 1:
        big = np.concatenate([x, x[..., :1]], axis=-1)
        yield "slice", big[..., :-1]


def _digest(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def grid():
    """{name: digest} for every call of the grid on the kernels cynorm selected."""
    import cynorm

    out = {}
    for threads in (1, 2):
        cynorm.set_num_threads(threads)
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(12345)
            for shape, ns in SHAPES_LN:
                nshape = ns if isinstance(ns, tuple) else (ns,)
                for offset in (0.0, 1e4):
                    x0 = _data(rng, shape, dtype, offset)
                    w = rng.uniform(0.5, 2, nshape).astype(dtype)
                    b = rng.standard_normal(nshape).astype(dtype)
                    g = rng.standard_normal(shape).astype(dtype)
                    for lay, x in _layouts(x0):
                        key = f"t{threads}/{np.dtype(dtype)}/ln{shape}/o{offset}/{lay}"
                        y, m, r = cynorm.layer_norm(x, nshape, w, b, return_stats=True)
                        out[key] = _digest(y, m, r)
                        out[key + "/noaffine"] = _digest(cynorm.layer_norm(x, nshape))
                        o = np.empty_like(x0)
                        cynorm.layer_norm(x, nshape, w, None, out=o)
                        out[key + "/out"] = _digest(o)
                        out[key + "/bwd"] = _digest(*cynorm.layer_norm_backward(
                            g, x, m, r, nshape, w, b))
                        out[key + "/bwd_now"] = _digest(*cynorm.layer_norm_backward(
                            g, x, m, r, nshape))
                        # RMSNorm and the residual forms, on the same values (g as residual)
                        y, r2 = cynorm.rms_norm(x, nshape, w, return_stats=True)
                        out[key + "/rms"] = _digest(y, r2)
                        out[key + "/rms_bwd"] = _digest(*cynorm.rms_norm_backward(
                            g, x, r2, nshape, w, grad_residual=g))
                        out[key + "/add_ln"] = _digest(*cynorm.add_layer_norm(
                            x, g, nshape, w, b, return_stats=True))
                        out[key + "/add_rms"] = _digest(*cynorm.add_rms_norm(
                            x, g, nshape, w, return_stats=True))
            for shape, axis in SHAPES_BN:
                for offset in (0.0, 1e4):
                    x0 = _data(rng, shape, dtype, offset)
                    C = shape[axis]
                    w = rng.uniform(0.5, 2, C).astype(dtype)
                    b = rng.standard_normal(C).astype(dtype)
                    g = rng.standard_normal(shape).astype(dtype)
                    for lay, x in _layouts(x0):
                        key = f"t{threads}/{np.dtype(dtype)}/bn{shape}a{axis}/o{offset}/{lay}"
                        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                        y, m, s = cynorm.batch_norm(x, rm, rv, w, b, True, 0.3, axis=axis,
                                                    return_stats=True)
                        out[key + "/train"] = _digest(y, m, s, rm, rv)
                        ye, me, se = cynorm.batch_norm(x, rm, rv, w, b, False, axis=axis,
                                                       return_stats=True)
                        out[key + "/eval"] = _digest(ye, me, se)
                        out[key + "/eval_f64stats"] = _digest(cynorm.batch_norm(
                            x, rm.astype(np.float64), rv.astype(np.float64), None, b,
                            axis=axis))
                        o = np.empty_like(x0)
                        cynorm.batch_norm(x, None, None, w, None, True, axis=axis, out=o)
                        out[key + "/out"] = _digest(o)
                        for training, (mm, ss) in ((True, (m, s)), (False, (me, se))):
                            out[key + f"/bwd{int(training)}"] = _digest(
                                *cynorm.batch_norm_backward(g, x, mm, ss, w, training,
                                                            axis=axis, bias=b))
                            out[key + f"/bwd{int(training)}_now"] = _digest(
                                *cynorm.batch_norm_backward(g, x, mm, ss, None, training,
                                                            axis=axis))
                        mo = cynorm.moments(x, axis=tuple(i for i in range(x.ndim)
                                                          if i != axis % x.ndim))
                        out[key + "/moments"] = _digest(mo.count, mo.mean, mo.var())
            for shape in MASKED:
                x = _data(rng, shape, dtype, 50.0)
                N, T, C = shape
                lengths = rng.integers(0, T + 1, N)
                lengths[0] = T
                mask = np.arange(T) < lengths[:, None]
                g = rng.standard_normal(shape).astype(dtype)
                w = rng.uniform(0.5, 2, C).astype(dtype)
                key = f"t{threads}/{np.dtype(dtype)}/masked{shape}"
                y, m, r = cynorm.layer_norm(x, C, w, None, return_stats=True, lengths=lengths)
                out[key + "/ln"] = _digest(y, m, r)
                out[key + "/ln_bwd"] = _digest(*cynorm.layer_norm_backward(
                    g, x, m, r, C, w, None, lengths=lengths))
                rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                y, m, s = cynorm.batch_norm(x, rm, rv, w, None, True, axis=-1, mask=mask,
                                            return_stats=True)
                out[key + "/bn"] = _digest(y, m, s, rm, rv)
                out[key + "/bn_bwd"] = _digest(*cynorm.batch_norm_backward(
                    g, x, m, s, w, True, axis=-1, mask=mask))
                mo = cynorm.moments(x, axis=(0, 1), mask=mask)
                out[key + "/moments"] = _digest(mo.count, mo.mean, mo.var())
            # GroupNorm and InstanceNorm, both layouts, masked too (after the others: their
            # draws do not move the earlier ones')
            for shape, G, axis in SHAPES_GN if hasattr(cynorm, "group_norm") else ():
                x = _data(rng, shape, dtype, 1e3)
                C = shape[axis]
                w = rng.uniform(0.5, 2, C).astype(dtype)
                b = rng.standard_normal(C).astype(dtype)
                g = rng.standard_normal(shape).astype(dtype)
                lengths = rng.integers(0, shape[2 if axis == 1 else 1] + 1, shape[0])
                key = f"t{threads}/{np.dtype(dtype)}/gn{shape}g{G}a{axis}"
                for kw, tag in (({}, ""), ({"lengths": lengths}, "/masked")):
                    if kw and len(shape) != 3:
                        continue
                    y, m, r = cynorm.group_norm(x, G, w, b, axis=axis, return_stats=True, **kw)
                    out[key + tag] = _digest(y, m, r)
                    out[key + tag + "/bwd"] = _digest(*cynorm.group_norm_backward(
                        g, x, m, r, G, w, bias=b, axis=axis, **kw))
                    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                    y, m, r = cynorm.instance_norm(x, rm, rv, w, b, axis=axis,
                                                   return_stats=True, **kw)
                    out[key + tag + "/in"] = _digest(y, m, r, rm, rv)
                    out[key + tag + "/in_bwd"] = _digest(*cynorm.instance_norm_backward(
                        g, x, m, r, w, bias=b, axis=axis, **kw))
    cynorm.set_num_threads(None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    p.add_argument("--one", action="store_true", help="only the kernels selected now")
    args = p.parse_args(argv)
    if args.compare:
        old, new = (json.load(open(f)) for f in args.compare)
        differ = [k for k in old if old[k] != new.get(k)]
        missing = [k for k in old if k not in new]
        print(f"{len(old)} entries compared: {len(differ)} differ, {len(missing)} missing")
        for k in differ[:40]:
            print("  differs:", k)
        return 1 if differ or missing or set(new) - set(old) else 0
    if args.one:
        json.dump(grid(), sys.stdout)
        return 0
    from cynorm import _isa

    result = {}
    for isa in _isa.available():
        env = dict(os.environ, CYNORM_ISA=isa)
        r = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True,
                           text=True, check=True)
        result.update({f"{isa}/{k}": v for k, v in json.loads(r.stdout).items()})
    json.dump(result, sys.stdout, indent=0, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
