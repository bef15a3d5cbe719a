"""What each case times: cynorm, the NumPy expression a user would write, torch (and
scikit-learn for the scaler), and the same-size copies of the memory roof; every contender of a
case computes the same thing (a test checks)."""
import numpy as np

from .grid import EPS, FUSED_OPS, GROUP_OPS, MASK_TARGETS, SKLEARN_OPS, np_dtype


def torch_of(torch, a):
    """torch.from_numpy(a), for bfloat16 arrays too (through their bits)."""
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # ml_dtypes' bfloat16
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy_bn_axes(case):
    axis = case.axis % len(case.shape)
    return tuple(i for i in range(len(case.shape)) if i != axis), axis


def _bn_setup(case, rng):
    """(reduced axes, feature axis, C, weight, bias, running_mean, running_var) of a BN case."""
    axes, axis = _numpy_bn_axes(case)
    C = case.shape[axis]
    w, b = _params(rng, C, case.dtype)
    dt = np_dtype(case.dtype)
    return axes, axis, C, w, b, np.zeros(C, dt), np.ones(C, dt)


def _params(rng, n, dtype):
    """weight and bias of n features, drawn as float32 (the same values in either dtype)."""
    w = rng.uniform(0.5, 2, n).astype(np.float32).astype(np_dtype(dtype))
    b = rng.standard_normal(n, dtype=np.float32).astype(np_dtype(dtype))
    return w, b


def contenders(case, torch=None, seed=0, peers=None, x=None):
    """{name: zero-argument callable} for one case, on fresh random data (not zeros), or on x
    when given; the parameters are drawn as float32 whatever the dtype, so a float64 case on
    the same x holds the same values.  peers: a peers.Peers, whose contenders join in."""
    import cynorm

    rng = np.random.default_rng(seed)
    if x is None:
        x = (3.0 + 2.0 * rng.standard_normal(case.shape, dtype=np.float32)).astype(
            np_dtype(case.dtype))
    if case.op in GROUP_OPS:
        from .group_contenders import group_contenders

        return group_contenders(case, x, rng, torch, peers)
    if case.op.endswith("bwd") or "_bwd_" in case.op:
        return _backward_contenders(case, x, rng, torch, peers)
    if case.op in MASK_TARGETS:
        return _mask_contenders(case, x, rng, torch)
    if case.op in ("moments",) + SKLEARN_OPS:
        return _table_contenders(case, x, torch, peers)
    if case.op in ("rms",) + FUSED_OPS:
        return _row_contenders(case, x, rng, torch, peers)
    out = np.empty_like(x)
    fns = {}
    if case.op == "ln":
        D = case.shape[-1]
        w, b = _params(rng, D, case.dtype)
        fns["cynorm"] = lambda: cynorm.layer_norm(x, D, w, b, EPS)
        fns["cynorm_out"] = lambda: cynorm.layer_norm(x, D, w, b, EPS, out=out)

        fns["numpy"] = lambda: _numpy_ln(x, w, b)
        if torch is not None:
            tx, tw, tb = (torch_of(torch, a) for a in (x, w, b))
            F = torch.nn.functional

            def torch_ln():
                with torch.no_grad():
                    return F.layer_norm(tx, (D,), tw, tb, EPS)

            fns["torch"] = torch_ln
        if peers is not None:
            fns.update(peers.contenders(case, {"x": x, "w": w, "b": b}))
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
        # 16-bit floats: in float32, as a user would, and back
        xc, wc, bc = (a.astype(np.float32) if a.dtype.itemsize == 2 else a for a in (x, w, b))
        if training:
            m = xc.mean(axis=axes)
            v = xc.var(axis=axes)
            np_rm[...] = 0.9 * np_rm.astype(m.dtype) + 0.1 * m
            np_rv[...] = 0.9 * np_rv.astype(m.dtype) + 0.1 * v * (n / (n - 1))
        else:
            m, v = (a.astype(xc.dtype) for a in (np_rm, np_rv))
        y = (xc - m.reshape(bshape)) / np.sqrt(v.reshape(bshape) + EPS) * wc.reshape(bshape) \
            + bc.reshape(bshape)
        return y.astype(x.dtype)

    fns["numpy"] = numpy_bn
    if torch is not None:
        tx = torch_of(torch, x)
        if axis != 1:  # torch wants the channel on axis 1: a permuted view, as a user would
            tx = tx.movedim(axis, 1)
        tw, tb, trm, trv = (torch_of(torch, a.copy()) for a in (w, b, rm, rv))
        F = torch.nn.functional

        def torch_bn():
            with torch.no_grad():
                y = F.batch_norm(tx, trm, trv, tw, tb, training, 0.1, EPS)
                return y.movedim(1, axis) if axis != 1 else y

        fns["torch"] = torch_bn
    if peers is not None:
        fns.update(peers.contenders(case, {"x": x, "w": w, "b": b, "rm": rm, "rv": rv}))
    return fns


def _numpy_ln(x, w, b):
    if x.dtype.itemsize == 2:  # 16-bit floats: in float32, as a user would, and back
        f32 = np.float32
        return _numpy_ln(x.astype(f32), w.astype(f32), b.astype(f32)).astype(x.dtype)
    m = x.mean(axis=-1, keepdims=True)
    v = x.var(axis=-1, keepdims=True)
    return (x - m) / np.sqrt(v + EPS) * w + b


def _numpy_rms(x, w):
    if x.dtype.itemsize == 2:
        return _numpy_rms(x.astype(np.float32), w.astype(np.float32)).astype(x.dtype)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def _row_contenders(case, x, rng, torch, peers):
    """RMSNorm and the residual-add forms (y, and h for those): cynorm (fresh outputs, and
    out= with residual_out=, preallocated), cynorm's own add then normalize, NumPy and torch
    (unfused, as a user writes them: torch has no fused residual op), and the peers."""
    import cynorm

    D = case.shape[-1]
    w, b = _params(rng, D, case.dtype)
    out, hout = np.empty_like(x), np.empty_like(x)
    fns = {}
    if case.op == "rms":
        fns["cynorm"] = lambda: cynorm.rms_norm(x, D, w, EPS)
        fns["cynorm_out"] = lambda: cynorm.rms_norm(x, D, w, EPS, out=out)
        fns["numpy"] = lambda: _numpy_rms(x, w)
        arrays = {"x": x, "w": w}
    else:
        r = rng.standard_normal(case.shape, dtype=np.float32).astype(np_dtype(case.dtype))
        arrays = {"x": x, "r": r, "w": w, "b": b}
        if case.op == "add_ln":
            fns["cynorm"] = lambda: cynorm.add_layer_norm(x, r, D, w, b, EPS)
            fns["cynorm_out"] = lambda: cynorm.add_layer_norm(x, r, D, w, b, EPS, out=out,
                                                              residual_out=hout)

            def unfused():
                h = np.add(x, r)
                return cynorm.layer_norm(h, D, w, b, EPS), h

            def numpy_add_ln():
                h = x + r
                return _numpy_ln(h, w, b), h

            fns["numpy"] = numpy_add_ln
        else:
            fns["cynorm"] = lambda: cynorm.add_rms_norm(x, r, D, w, EPS)
            fns["cynorm_out"] = lambda: cynorm.add_rms_norm(x, r, D, w, EPS, out=out,
                                                            residual_out=hout)

            def unfused():
                h = np.add(x, r)
                return cynorm.rms_norm(h, D, w, EPS), h

            def numpy_add_rms():
                h = x + r
                return _numpy_rms(h, w), h

            fns["numpy"] = numpy_add_rms
        fns["cynorm_unfused"] = unfused
    if torch is not None:
        t = {k: torch_of(torch, a) for k, a in arrays.items()}
        F = torch.nn.functional
        if case.op == "rms":
            def torch_fn():
                with torch.no_grad():
                    return F.rms_norm(t["x"], (D,), t["w"], EPS)
        elif case.op == "add_ln":
            def torch_fn():
                with torch.no_grad():
                    h = t["x"] + t["r"]
                    return F.layer_norm(h, (D,), t["w"], t["b"], EPS), h
        else:
            def torch_fn():
                with torch.no_grad():
                    h = t["x"] + t["r"]
                    return F.rms_norm(h, (D,), t["w"], EPS), h
        fns["torch"] = torch_fn
    if peers is not None:
        fns.update(peers.contenders(case, arrays))
    return fns


def numpy_in_float32(fn, *arrays):
    """A zero-argument call of fn on arrays as a NumPy user would write it: 16-bit arrays
    converted to float32 first and the results back to their dtype (NumPy rounds each 16-bit
    step, and its bfloat16 arithmetic is slow), other arrays as they are."""
    dt = arrays[0].dtype
    if dt.itemsize != 2:
        return lambda: fn(*arrays)

    def run():
        out = fn(*(a.astype(np.float32) if a.dtype.itemsize == 2 else a for a in arrays))
        return tuple(o.astype(dt) for o in out) if isinstance(out, tuple) else out.astype(dt)
    return run


def _backward_contenders(case, x, rng, torch, peers=None):
    import cynorm

    dt = np_dtype(case.dtype)
    cdt = np.dtype(np.float32) if dt.itemsize == 2 else dt   # the stats NumPy gets
    g = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
    fns = {}
    if case.op == "rms_bwd":
        D = case.shape[-1]
        w, _ = _params(rng, D, case.dtype)
        _, rstd = cynorm.rms_norm(x, D, w, EPS, return_stats=True)
        fns["cynorm"] = lambda: cynorm.rms_norm_backward(g, x, rstd, D, w)
        axes = tuple(range(x.ndim - 1))

        def numpy_rms_bwd(x, g, w, r):
            xh = x * r
            gw = g * w
            return r * gw - xh * (r * (gw * xh).mean(-1, keepdims=True)), (g * xh).sum(axis=axes)

        fns["numpy"] = numpy_in_float32(numpy_rms_bwd, x, g, w, rstd.astype(cdt))
        if torch is not None:
            # torch's CPU RMSNorm is a composite: its backward is autograd through it (the
            # graph of one forward, kept; only the backward is timed)
            tx = torch_of(torch, x).requires_grad_(True)
            tw = torch_of(torch, w).requires_grad_(True)
            ty = torch.nn.functional.rms_norm(tx, (D,), tw, EPS)
            tg = torch_of(torch, g)
            fns["torch"] = lambda: torch.autograd.grad(ty, (tx, tw), tg, retain_graph=True)
        if peers is not None:
            fns.update(peers.contenders(case, {"x": x, "g": g, "w": w}))
        return fns
    if case.op == "ln_bwd":
        D = case.shape[-1]
        w, b = _params(rng, D, case.dtype)
        _, mean, rstd = cynorm.layer_norm(x, D, w, b, EPS, return_stats=True)
        fns["cynorm"] = lambda: cynorm.layer_norm_backward(g, x, mean, rstd, D, w, b)
        axes = tuple(range(x.ndim - 1))

        def numpy_ln_bwd(x, g, w, m, r):
            xh = (x - m) * r
            gw = g * w
            dx = r * (gw - gw.mean(-1, keepdims=True) - xh * (gw * xh).mean(-1, keepdims=True))
            return dx, (g * xh).sum(axis=axes), g.sum(axis=axes)

        fns["numpy"] = numpy_in_float32(numpy_ln_bwd, x, g, w, mean.astype(cdt),
                                        rstd.astype(cdt))
        if torch is not None:
            tx, tg, tw, tb = (torch_of(torch, a) for a in (x, g, w, b))
            with torch.no_grad():
                _, tm, tr = torch.ops.aten.native_layer_norm(tx, [D], tw, tb, EPS)
            op = torch.ops.aten.native_layer_norm_backward

            def torch_ln_bwd():
                with torch.no_grad():
                    return op(tg, tx, [D], tm, tr, tw, tb, [True, True, True])

            fns["torch"] = torch_ln_bwd
        if peers is not None:
            fns.update(peers.contenders(case, {"x": x, "g": g, "w": w, "b": b}))
        return fns

    axes, axis, C, w, b, rm, rv = _bn_setup(case, rng)
    training = case.op == "bn_bwd_train"
    _, mean, invstd = cynorm.batch_norm(x, rm.copy(), rv.copy(), w, b, training, 0.1, EPS,
                                        axis=case.axis, return_stats=True)
    fns["cynorm"] = lambda: cynorm.batch_norm_backward(g, x, mean, invstd, w, training,
                                                       axis=case.axis, bias=b)
    bshape = [1] * len(case.shape)
    bshape[axis] = C
    n = x.size // C

    def numpy_bn_bwd(x, g, w, m, inv):
        m, inv, wb = (a.reshape(bshape) for a in (m, inv, w))
        xh = (x - m) * inv
        sg = g.sum(axis=axes)
        sgx = (g * xh).sum(axis=axes)
        if training:
            dx = wb * inv * (g - sg.reshape(bshape) / n - xh * sgx.reshape(bshape) / n)
        else:
            dx = g * (wb * inv)
        return dx, sgx, sg

    fns["numpy"] = numpy_in_float32(numpy_bn_bwd, x, g, w, mean.astype(cdt), invstd.astype(cdt))
    if torch is not None:
        tx, tg = torch_of(torch, x), torch_of(torch, g)
        if axis != 1:
            tx, tg = tx.movedim(axis, 1), tg.movedim(axis, 1)
        tw, tb, trm, trv = (torch_of(torch, a.copy()) for a in (w, b, rm, rv))
        with torch.no_grad():   # the statistics torch's own forward saves
            _, tmean, tinv = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, training,
                                                              0.1, EPS)
        op = torch.ops.aten.native_batch_norm_backward

        def torch_bn_bwd():
            with torch.no_grad():
                dx, dw, db = op(tg, tx, tw, trm, trv, tmean, tinv, training, EPS,
                                [True, True, True])
                return (dx.movedim(1, axis) if axis != 1 else dx), dw, db

        fns["torch"] = torch_bn_bwd
    if peers is not None:
        fns.update(peers.contenders(case, {"x": x, "g": g, "w": w, "b": b, "rm": rm, "rv": rv}))
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

        def numpy_ln_masked(x):
            y = np.zeros_like(x)
            r = x[mask]
            y[mask] = (r - r.mean(-1, keepdims=True)) / np.sqrt(r.var(-1, keepdims=True) + EPS)
            return y

        fns["numpy"] = numpy_in_float32(numpy_ln_masked, x)
        if torch is not None:
            tx = torch_of(torch, x)

            def torch_ln():  # torch has no mask: the whole padded batch
                with torch.no_grad():
                    return torch.nn.functional.layer_norm(tx, (C,), eps=EPS)

            fns["torch"] = torch_ln
        return fns
    rm, rv = np.zeros(C, case.dtype), np.ones(C, case.dtype)
    fns["cynorm"] = lambda: cynorm.batch_norm(x, rm, rv, training=True, axis=-1, lengths=lengths)
    fns["cynorm_reference"] = lambda: cynorm.batch_norm(real, rm, rv, training=True)

    def numpy_bn_masked(x):
        y = np.zeros_like(x)
        r = x[mask]
        y[mask] = (r - r.mean(0)) / np.sqrt(r.var(0) + EPS)
        return y

    fns["numpy"] = numpy_in_float32(numpy_bn_masked, x)
    if torch is not None:
        treal = torch_of(torch, real)
        trm, trv = torch_of(torch, rm.copy()), torch_of(torch, rv.copy())

        def torch_bn_real():  # torch has no mask: BN on the real tokens alone
            with torch.no_grad():
                return torch.nn.functional.batch_norm(treal, trm, trv, training=True, eps=EPS)

        fns["torch"] = torch_bn_real
    return fns


def _table_contenders(case, x, torch, peers=None):
    """Statistics of an (N, C) table: moments against NumPy and torch; BatchNormScaler
    (eps=0: StandardScaler's arithmetic) against scikit-learn's StandardScaler."""
    import cynorm

    fns = {}
    if case.op == "moments":
        fns["cynorm"] = lambda: cynorm.moments(x, 0)
        fns["numpy"] = lambda: (x.mean(axis=0), x.var(axis=0))
        if torch is not None:
            tx = torch_of(torch, x)
            fns["torch"] = lambda: torch.var_mean(tx, 0, correction=0)
        if peers is not None:
            fns.update(peers.contenders(case, {"x": x}))
        return fns
    from cynorm.sklearn import BatchNormScaler

    fns["cynorm"] = lambda: BatchNormScaler(eps=0.0).fit_transform(x)
    try:
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return fns
    fns["sklearn"] = lambda: StandardScaler().fit_transform(x)
    return fns


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
