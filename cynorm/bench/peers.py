"""The peers a CPU user would also pick: ONNX Runtime and JAX, each optional.

ONNX Runtime: each case is a one-node ONNX model built here with the ``onnx`` package (the
standard LayerNormalization-17, RMSNormalization-23 and BatchNormalization-15, inference or
training mode; ORT's own SkipLayerNormalization and SkipSimplifiedLayerNormalization for the
residual forms), run on
the CPU execution provider with cynorm's thread count and its intra-op spinning turned off:
with ORT's default spinning its pool keeps the cores busy after each run, which made cynorm's
and torch's calls in the same process several times slower (shared/PERF.md).

JAX: the jit-compiled expression (``block_until_ready``, inputs already on the device), timed
in a worker process of its own: once XLA's CPU pool has run a computation it slows every
OpenMP call in the process.  The worker answers the same calibrate / sample requests as a
local contender, so its samples interleave with the others' round by round.
"""
import importlib.util
import multiprocessing
import os
import time

import numpy as np

from .grid import EPS, GROUPS

PEERS = ("onnxruntime", "jax")
# what each peer has a case for (ONNX Runtime: inference ops and BN's training mode; no
# backward, no masks, and BatchNormalization only with the channel on axis 1)
ONNX_OPS = ("ln", "rms", "add_ln", "add_rms", "bn_train", "bn_eval", "gn", "in")
JAX_OPS = ("ln", "rms", "add_ln", "add_rms", "bn_train", "bn_eval", "ln_bwd", "rms_bwd",
           "bn_bwd_train", "bn_bwd_eval", "moments", "gn", "in", "gn_bwd", "in_bwd")
# ONNX Runtime's node for each row op: the standard op where there is one, else ORT's own
# (com.microsoft): (op type, domain, opset, inputs, outputs); "" skips an optional output
ONNX_ROW_NODES = {
    "ln": ("LayerNormalization", "", 17, ["X", "W", "B"], ["Y"]),
    "rms": ("RMSNormalization", "", 23, ["X", "W"], ["Y"]),
    "add_ln": ("SkipLayerNormalization", "com.microsoft", 1, ["X", "R", "W", "B"],
               ["Y", "", "", "H"]),
    "add_rms": ("SkipSimplifiedLayerNormalization", "com.microsoft", 1, ["X", "R", "W"],
                ["Y", "", "", "H"]),
}


def installed():
    """The peers that can be imported here."""
    need = {"onnxruntime": ("onnx", "onnxruntime"), "jax": ("jax",)}
    return [p for p in PEERS if all(importlib.util.find_spec(m) for m in need[p])]


# ---- ONNX Runtime --------------------------------------------------------------------------

def onnx_session(op, shape, dtype, threads):
    """(session, input names, output count) of the one-node model for op on inputs of shape."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE,
            "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    C = shape[-1] if op in ONNX_ROW_NODES else shape[1]

    def value(name, dims):
        return helper.make_tensor_value_info(name, elem, list(dims))

    if op in ("gn", "in"):  # GroupNormalization-21 (per-channel scale), InstanceNormalization
        inputs = [value("X", shape), value("W", (C,)), value("B", (C,))]
        outputs = [value("Y", shape)]
        attrs = {"num_groups": GROUPS} if op == "gn" else {}
        node = helper.make_node("GroupNormalization" if op == "gn" else "InstanceNormalization",
                                ["X", "W", "B"], ["Y"], epsilon=EPS, **attrs)
        opset, domain = (21 if op == "gn" else 17), ""
    elif op in ONNX_ROW_NODES:
        kind, domain, opset, names, outs = ONNX_ROW_NODES[op]
        dims = {"X": shape, "R": shape, "W": (C,), "B": (C,)}
        inputs = [value(n, dims[n]) for n in names]
        outputs = [value(n, shape) for n in outs if n]
        attrs = {"axis": -1} if domain == "" else {}
        node = helper.make_node(kind, names, outs, epsilon=EPS, domain=domain, **attrs)
    else:
        inputs = [value("X", shape), value("W", (C,)), value("B", (C,)), value("M", (C,)),
                  value("V", (C,))]
        outputs = [value("Y", shape)]
        if op == "bn_train":  # ONNX's momentum weighs the old value: torch's 0.1 is 0.9 here
            outputs += [value("RM", (C,)), value("RV", (C,))]
            node = helper.make_node("BatchNormalization", ["X", "W", "B", "M", "V"],
                                    ["Y", "RM", "RV"], epsilon=EPS, momentum=0.9,
                                    training_mode=1)
        else:
            node = helper.make_node("BatchNormalization", ["X", "W", "B", "M", "V"], ["Y"],
                                    epsilon=EPS)
        opset, domain = 15, ""
    graph = helper.make_graph([node], op, inputs, outputs)
    imports = [helper.make_opsetid("", 17), helper.make_opsetid(domain, opset)] if domain \
        else [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=imports)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess, [i.name for i in inputs]


def onnx_supports(case):
    """Whether ONNX Runtime has the case: its op, on the channel axis 1 for the BN and group
    ops, in a dtype its CPU kernels take."""
    if case.op not in ONNX_OPS or (case.op not in ONNX_ROW_NODES
                                   and case.axis % len(case.shape) != 1):
        return False
    if case.dtype == "bfloat16":
        return False  # its Python API takes no bfloat16 NumPy arrays (nor ml_dtypes')
    # its Skip*LayerNormalization and InstanceNormalization kernels: float32 and float16 only
    return not (case.op in ("add_ln", "add_rms", "in") and case.dtype == "float64")


def onnx_contender(case, arrays, threads):
    """A callable running the case's model on arrays (x, w, b[, rm, rv]), or None."""
    if not onnx_supports(case):
        return None
    sess, names = onnx_session(case.op, case.shape, case.dtype, threads)
    keys = {"X": "x", "R": "r", "W": "w", "B": "b", "M": "rm", "V": "rv"}
    feed = {n: np.ascontiguousarray(arrays[keys[n]]) for n in names}
    return lambda: sess.run(None, feed)


# ---- JAX -------------------------------------------------------------------------------------

def jax_function(op, axis, ndim):
    """The jit-compiled JAX expression of op (arguments as jax_arguments orders them)."""
    import jax
    import jax.numpy as jnp

    axis = axis % ndim
    axes = tuple(i for i in range(ndim) if i != axis)
    bshape = tuple(-1 if i == axis else 1 for i in range(ndim))

    def ln(x, w, b):
        m = x.mean(-1, keepdims=True)
        v = jnp.square(x - m).mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + EPS) * w + b

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + EPS) * w

    def add_ln(x, r, w, b):
        h = x + r
        return ln(h, w, b), h

    def add_rms(x, r, w):
        h = x + r
        return rms(h, w), h

    def bn_batch(x, w, b):
        m = x.mean(axes, keepdims=True)
        v = jnp.square(x - m).mean(axes, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + EPS) * w.reshape(bshape) + b.reshape(bshape)

    def bn_train(x, w, b, rm, rv):
        n = x.size // x.shape[axis]
        m = x.mean(axes)
        v = jnp.square(x - m.reshape(bshape)).mean(axes)
        y = (x - m.reshape(bshape)) * jax.lax.rsqrt(v.reshape(bshape) + EPS) \
            * w.reshape(bshape) + b.reshape(bshape)
        return y, 0.9 * rm + 0.1 * m, 0.9 * rv + 0.1 * v * (n / (n - 1))

    def bn_eval(x, w, b, rm, rv):
        return (x - rm.reshape(bshape)) * jax.lax.rsqrt(rv.reshape(bshape) + EPS) \
            * w.reshape(bshape) + b.reshape(bshape)

    def backward(f):
        def grads(x, w, b, g, *rest):
            _, pullback = jax.vjp(lambda x, w, b: f(x, w, b, *rest), x, w, b)
            return pullback(g)
        return grads

    def rms_bwd(x, w, g):
        _, pullback = jax.vjp(rms, x, w)
        return pullback(g)

    def group(G):
        """GroupNorm with G groups (InstanceNorm: G = C), channels on ``axis`` (1 or last)."""
        def gn(x, w, b):
            N, C = x.shape[0], x.shape[axis]
            xg = x.reshape(N, G, C // G, -1) if axis == 1 else x.reshape(N, -1, G, C // G)
            red = (2, 3) if axis == 1 else (1, 3)
            m = xg.mean(red, keepdims=True)
            v = jnp.square(xg - m).mean(red, keepdims=True)
            y = ((xg - m) * jax.lax.rsqrt(v + EPS)).reshape(x.shape)
            return y * w.reshape(bshape) + b.reshape(bshape)
        return gn

    def instance(x, w, b):
        return group(x.shape[axis])(x, w, b)

    fns = {"ln": ln, "rms": rms, "add_ln": add_ln, "add_rms": add_rms, "rms_bwd": rms_bwd,
           "gn": group(GROUPS), "in": instance, "gn_bwd": backward(group(GROUPS)),
           "in_bwd": backward(instance),
           "bn_train": bn_train, "bn_eval": bn_eval,
           "ln_bwd": backward(ln), "bn_bwd_train": backward(bn_batch),
           "bn_bwd_eval": backward(bn_eval),
           "moments": lambda x: (x.mean(0), jnp.square(x - x.mean(0)).mean(0))}
    return jax.jit(fns[op])


def jax_arguments(op, arrays):
    """The arrays jax_function(op) takes, in its order."""
    if op == "moments":
        return (arrays["x"],)
    if op == "rms":
        return (arrays["x"], arrays["w"])
    if op == "rms_bwd":
        return (arrays["x"], arrays["w"], arrays["g"])
    if op in ("add_ln", "add_rms"):
        return (arrays["x"], arrays["r"], arrays["w"]) + ((arrays["b"],) if op == "add_ln"
                                                          else ())
    base = (arrays["x"], arrays["w"], arrays["b"])
    if op.endswith("_bwd") or "_bwd_" in op:
        base += (arrays["g"],)
    if op in ("bn_train", "bn_eval", "bn_bwd_eval"):
        base += (arrays["rm"], arrays["rv"])
    return base


def jax_in_process(case, arrays):
    """The case's JAX contender as a local callable (for the pytest-benchmark suite, which
    runs every JAX row after all the others, and for tests), or None."""
    if case.op not in JAX_OPS:
        return None
    import jax

    jax.config.update("jax_enable_x64", True)
    fn = jax_function(case.op, case.axis, len(case.shape))
    args = [jax.device_put(a) for a in jax_arguments(case.op, arrays)]
    jax.block_until_ready(fn(*args))
    return lambda: jax.block_until_ready(fn(*args))


def in_process(names=PEERS, threads=None):
    """Peers that run JAX in this process too (the pytest-benchmark suite, which runs every JAX
    row after all the others, and the tests)."""
    import cynorm

    return Peers(names, threads or cynorm.get_num_threads(), jax_worker=False)


def _jax_serve(conn, threads):
    """The JAX worker's loop (a spawned process): prepare, calibrate, sample, result."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:max(1, threads)])
    except (AttributeError, OSError):
        pass
    import jax

    jax.config.update("jax_enable_x64", True)  # float64 cases; float32 stays float32
    conn.send(("ok", jax.__version__))
    fn = args = None
    while True:
        msg = conn.recv()
        try:
            if msg[0] == "stop":
                return
            if msg[0] == "prepare":
                _, op, axis, ndim, arrays = msg
                fn = jax_function(op, axis, ndim)
                args = [jax.device_put(a) for a in jax_arguments(op, arrays)]
                jax.block_until_ready(fn(*args))  # compile
                conn.send(("ok", None))
            elif msg[0] == "calibrate":
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                dt = max(time.perf_counter() - t0, 1e-7)
                k = max(1, min(10_000, int(2e-3 / dt)))
                conn.send(("ok", (k, k * dt)))
            elif msg[0] == "sample":
                _, k, warm = msg
                for _ in range(warm):  # untimed calls first
                    jax.block_until_ready(fn(*args))
                t0 = time.perf_counter()
                for _ in range(k):
                    jax.block_until_ready(fn(*args))
                conn.send(("ok", (time.perf_counter() - t0) / k))
            elif msg[0] == "result":
                out = fn(*args)
                out = out if isinstance(out, tuple) else (out,)
                conn.send(("ok", [np.asarray(o) for o in out]))
        except Exception as exc:  # reported to the caller, the worker stays up
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class JaxWorker:
    """JAX in a process of its own; ``contender(case, arrays)`` gives a remote contender."""

    def __init__(self, threads):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_jax_serve, args=(child, threads), daemon=True)
        self._proc.start()
        self.version = self._answer()  # the worker's first word: JAX's version

    def _answer(self):
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"the JAX worker: {value}")
        return value

    def ask(self, *msg):
        self._conn.send(msg)
        return self._answer()

    def contender(self, case, arrays):
        if case.op not in JAX_OPS:
            return None
        self.ask("prepare", case.op, case.axis, len(case.shape), dict(arrays))
        return _Remote(self)

    def close(self):
        try:
            self._conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()


class _Remote:
    """A contender that runs in the JAX worker: the interface timing.timed asks of every one."""

    def __init__(self, worker):
        self.worker = worker

    def __call__(self):
        return self.worker.ask("result")

    def calibrate(self):
        return tuple(self.worker.ask("calibrate"))

    def sample(self, k, warm):
        return self.worker.ask("sample", k, warm)


class Peers:
    """The peers of one run: which ones, their thread count, and JAX's worker process (started
    once), or JAX in this process with jax_worker=False."""

    def __init__(self, names, threads, jax_worker=True):
        self.names = [n for n in names if n in installed()]
        self.threads = threads
        self.jax = JaxWorker(threads) if "jax" in self.names and jax_worker else None

    def contenders(self, case, arrays):
        fns = {}
        if "onnxruntime" in self.names:
            fns["onnxruntime"] = onnx_contender(case, arrays, self.threads)
        if "jax" in self.names:
            fns["jax"] = (self.jax.contender(case, arrays) if self.jax is not None
                          else jax_in_process(case, arrays))
        return {name: fn for name, fn in fns.items() if fn is not None}

    def versions(self):
        out = {}
        if "onnxruntime" in self.names:
            import onnxruntime

            out["onnxruntime"] = onnxruntime.__version__
        if "jax" in self.names:
            import importlib.metadata

            out["jax"] = (self.jax.version if self.jax is not None
                          else importlib.metadata.version("jax"))
        return out

    def close(self):
        if self.jax is not None:
            self.jax.close()
