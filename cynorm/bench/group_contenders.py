"""The group norms' cases (GroupNorm, InstanceNorm; forward and backward; channels-first or
channels-last): cynorm, the NumPy expression, torch (channels-last as torch's channels_last
memory format, a permuted view of the same array) and the peers."""
import numpy as np

from .contenders import _params, numpy_in_float32, torch_of
from .grid import EPS, GROUPS, np_dtype


def _groups(case):
    """(channel axis, C, groups) of a group-norm case (InstanceNorm: one channel a group)."""
    axis = case.axis % len(case.shape)
    C = case.shape[axis]
    return axis, C, (GROUPS if case.op.startswith("gn") else C)


def _numpy_forward(x, G, w, b, axis, want_stats=False):
    """The NumPy expression: channels-first view (N, G, C/G, S), or (N, S, G, C/G)."""
    N, C = x.shape[0], x.shape[axis]
    xg = x.reshape(N, G, C // G, -1) if axis == 1 else x.reshape(N, -1, G, C // G)
    red = (2, 3) if axis == 1 else (1, 3)
    m = xg.mean(axis=red, keepdims=True)
    v = xg.var(axis=red, keepdims=True)
    r = 1 / np.sqrt(v + EPS)
    pshape = (1, C) + (1,) * (x.ndim - 2) if axis == 1 else (C,)
    y = ((xg - m) * r).reshape(x.shape) * w.reshape(pshape) + b.reshape(pshape)
    return (y, m, r, xg, red, pshape) if want_stats else y


def group_contenders(case, x, rng, torch, peers):
    import cynorm

    axis, C, G = _groups(case)
    cy_axis = 1 if axis == 1 else -1
    w, b = _params(rng, C, case.dtype)
    instance = case.op.startswith("in")
    fns = {}
    if not case.op.endswith("bwd"):
        out = np.empty_like(x)
        if instance:
            fns["cynorm"] = lambda: cynorm.instance_norm(x, None, None, w, b, eps=EPS,
                                                         axis=cy_axis)
            fns["cynorm_out"] = lambda: cynorm.instance_norm(x, None, None, w, b, eps=EPS,
                                                             axis=cy_axis, out=out)
        else:
            fns["cynorm"] = lambda: cynorm.group_norm(x, G, w, b, EPS, axis=cy_axis)
            fns["cynorm_out"] = lambda: cynorm.group_norm(x, G, w, b, EPS, axis=cy_axis,
                                                          out=out)
        fns["numpy"] = numpy_in_float32(lambda x, w, b: _numpy_forward(x, G, w, b, axis), x, w,
                                        b)
        arrays = {"x": x, "w": w, "b": b}
    else:
        g = rng.standard_normal(case.shape, dtype=np.float32).astype(np_dtype(case.dtype))
        if instance:
            _, mean, rstd = cynorm.instance_norm(x, None, None, w, b, eps=EPS, axis=cy_axis,
                                                 return_stats=True)
            fns["cynorm"] = lambda: cynorm.instance_norm_backward(g, x, mean, rstd, w, bias=b,
                                                                  axis=cy_axis)
        else:
            _, mean, rstd = cynorm.group_norm(x, G, w, b, EPS, axis=cy_axis,
                                              return_stats=True)
            fns["cynorm"] = lambda: cynorm.group_norm_backward(g, x, mean, rstd, G, w, bias=b,
                                                               axis=cy_axis)

        def numpy_backward(x, g, w, b):
            _, m, r, xg, red, pshape = _numpy_forward(x, G, w, b, axis, want_stats=True)
            xh = (xg - m) * r
            gw = (g * w.reshape(pshape)).reshape(xg.shape)
            dx = r * (gw - gw.mean(axis=red, keepdims=True)
                      - xh * (gw * xh).mean(axis=red, keepdims=True))
            other = tuple(i for i in range(x.ndim) if i != axis)
            return (dx.reshape(x.shape), (g * xh.reshape(x.shape)).sum(axis=other),
                    g.sum(axis=other))

        fns["numpy"] = numpy_in_float32(numpy_backward, x, g, w, b)
        arrays = {"x": x, "w": w, "b": b, "g": g}
    if torch is not None:
        fns["torch"] = _torch(case, torch, arrays, axis, G, instance)
    if peers is not None:
        fns.update(peers.contenders(case, arrays))
    return fns


def _torch(case, torch, arrays, axis, G, instance):
    """torch's F.group_norm / F.instance_norm; backward: autograd on the graph of one forward
    (kept; only the backward is timed)."""
    F = torch.nn.functional
    t = {k: torch_of(torch, a) for k, a in arrays.items()}
    if axis != 1:  # channels-last: torch's channels_last layout, a view of the same memory
        t["x"] = t["x"].movedim(-1, 1)
        if "g" in t:
            t["g"] = t["g"].movedim(-1, 1)

    def forward(x, w, b):
        if instance:
            return F.instance_norm(x, None, None, w, b, True, 0.1, EPS)
        return F.group_norm(x, G, w, b, EPS)

    if not case.op.endswith("bwd"):
        def torch_forward():
            with torch.no_grad():
                y = forward(t["x"], t["w"], t["b"])
                return y.movedim(1, -1) if axis != 1 else y
        return torch_forward
    tx, tw, tb = (t[k].clone().requires_grad_(True) if k != "x" else t[k].requires_grad_(True)
                  for k in ("x", "w", "b"))
    ty = forward(tx, tw, tb)

    def torch_backward():
        dx, dw, db = torch.autograd.grad(ty, (tx, tw, tb), t["g"], retain_graph=True)
        return (dx.movedim(1, -1) if axis != 1 else dx), dw, db
    return torch_backward
