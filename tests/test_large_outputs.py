"""Outputs large enough for the kernels' streaming stores (from 8 MiB on one thread, 24 MiB on
more): the same values as the normal stores, at every alignment of the output's rows."""
import numpy as np
import pytest

import cynorm
from cynorm import _isa
from conftest import (TOL, at_phase, hostile, max_err, reference_eval_backward,
                      reference_norm_backward, reference_rms, rel_err)

ONE_THREAD_STREAMS = (1100, 2049)       # 9.0 MB of float32: streamed on 1 thread; on 2, plain
#                                         stores (LN: each row prefetching the next)
EVERY_COUNT_STREAMS = (3100, 2049)      # 25.4 MB of float32: streamed on any thread count


def run(n_threads, f, x, **kw):
    """f(x, out=...) on n_threads threads into a fresh out, and into garbage-filled ones that
    start at several places in a line (the rows' streamed whole lines then begin after a plain
    part of 0, 1 or more vectors, and end before one)."""
    with cynorm.num_threads(n_threads):
        fresh = f(x, **kw)
        for phase in (4, 24, 44):
            odd = at_phase(x, phase)
            odd.fill(np.nan)
            assert f(x, out=odd, **kw) is odd
            np.testing.assert_array_equal(odd, fresh, err_msg=f"out {phase} bytes into a line")
    return fresh


@pytest.mark.parametrize("shape", [ONE_THREAD_STREAMS, EVERY_COUNT_STREAMS])
def test_layer_norm(rng, ref_layer_norm, shape):
    x = hostile(rng, shape, np.float32)
    w = rng.uniform(0.5, 2, shape[1]).astype(np.float32)
    b = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    f = lambda x, **kw: cynorm.layer_norm(x, shape[1], w, b, **kw)  # noqa: E731
    y1, y2 = run(1, f, x), run(2, f, x)
    np.testing.assert_array_equal(y1, y2)   # rows are normalized alike on any thread count
    assert max_err(y1, ref_layer_norm(x, shape[1], w, b)) <= 4 * TOL[np.dtype(np.float32)]


@pytest.mark.parametrize("shape", [ONE_THREAD_STREAMS, EVERY_COUNT_STREAMS])
def test_rms_norm_and_the_residual_forms(rng, shape):
    # streamed y, and streamed h for the residual forms (their outputs count twice)
    x = hostile(rng, shape, np.float32)
    res = hostile(rng, shape, np.float32)
    w = rng.uniform(0.5, 2, shape[1]).astype(np.float32)
    f = lambda x, **kw: cynorm.rms_norm(x, shape[1], w, **kw)  # noqa: E731
    y1, y2 = run(1, f, x), run(2, f, x)
    np.testing.assert_array_equal(y1, y2)
    assert rel_err(y1, reference_rms(x, shape[1], w)[0]) <= 1e-6
    h_want = x + res
    for fused, norm in ((cynorm.add_rms_norm, cynorm.rms_norm),
                        (cynorm.add_layer_norm, cynorm.layer_norm)):
        want = norm(h_want, shape[1], w)
        for n_threads in (1, 2):
            with cynorm.num_threads(n_threads):
                y, h = fused(x, res, shape[1], w)
                np.testing.assert_array_equal(h, h_want)
                np.testing.assert_array_equal(y, want)
                for phase in (4, 44):
                    out, hout = at_phase(x, phase), at_phase(x, 64 - phase)
                    out.fill(np.nan)
                    hout.fill(np.nan)
                    fused(x, res, shape[1], w, out=out, residual_out=hout)
                    np.testing.assert_array_equal(hout, h_want)
                    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("affine", ["weight", "bias", "neither"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_without_weight_or_bias(rng, ref_layer_norm, affine, dtype):
    # the rows' chunks (each after a prefetch of the next row) take their part of w and b
    shape = (ONE_THREAD_STREAMS[0] // (np.dtype(dtype).itemsize // 4), ONE_THREAD_STREAMS[1])
    x = hostile(rng, shape, dtype)
    w = rng.uniform(0.5, 2, shape[1]).astype(dtype) if affine == "weight" else None
    b = rng.uniform(-1, 1, shape[1]).astype(dtype) if affine == "bias" else None
    f = lambda x, **kw: cynorm.layer_norm(x, shape[1], w, b, **kw)  # noqa: E731
    y1, y2 = run(1, f, x), run(2, f, x)
    np.testing.assert_array_equal(y1, y2)
    assert max_err(y1, ref_layer_norm(x, shape[1], w, b)) <= 4 * TOL[np.dtype(dtype)]


@pytest.mark.parametrize("shape", [ONE_THREAD_STREAMS, EVERY_COUNT_STREAMS])
@pytest.mark.parametrize("layout", ["(N, C)", "(N, C, L)", "(N, T, C)"])
def test_batch_norm_eval(rng, ref_batch_norm, shape, layout):
    x, axis = {"(N, C)": (hostile(rng, shape, np.float32), 1),
               "(N, C, L)": (hostile(rng, (shape[0], 3, shape[1]), np.float32)[:, :, :683], 1),
               "(N, T, C)": (hostile(rng, (shape[0] // 4, 4, shape[1]), np.float32), -1)}[layout]
    x = np.ascontiguousarray(x)
    C = x.shape[axis]
    rm = (np.mean(x, axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))
          + rng.standard_normal(C)).astype(np.float32)
    rv = rng.uniform(0.5, 2, C).astype(np.float32) * np.float32(np.var(x[:64]))
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    f = lambda x, **kw: cynorm.batch_norm(x, rm, rv, w, b, training=False, axis=axis, **kw)  # noqa: E731
    y1, y2 = run(1, f, x), run(2, f, x)
    np.testing.assert_array_equal(y1, y2)
    want = ref_batch_norm(x, axis, w, b, 1e-5, rm, rv)
    assert max_err(y1, want) <= 4 * TOL[np.dtype(np.float32)] * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("shape", [ONE_THREAD_STREAMS, EVERY_COUNT_STREAMS])
def test_batch_norm_training(rng, ref_batch_norm, shape):
    x = hostile(rng, shape, np.float32)
    w = rng.uniform(0.5, 2, shape[1]).astype(np.float32)
    b = rng.uniform(-1, 1, shape[1]).astype(np.float32)
    f = lambda x, **kw: cynorm.batch_norm(x, None, None, w, b, training=True, **kw)  # noqa: E731
    want = ref_batch_norm(x, 1, w, b)
    for n in (1, 2):
        assert max_err(run(n, f, x), want) <= 4 * TOL[np.dtype(np.float32)]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_padding_rows_of_large_outputs(rng, ref_layer_norm, n_threads):
    # masked rows are zeroed with streaming stores as well, in garbage-filled outputs
    x = hostile(rng, EVERY_COUNT_STREAMS, np.float32)
    mask = rng.random(x.shape[0]) < 0.7
    f = lambda x, **kw: cynorm.layer_norm(x, x.shape[1], mask=mask, **kw)  # noqa: E731
    y = run(n_threads, f, x)
    assert not y[~mask].any()
    assert max_err(y[mask], ref_layer_norm(x[mask], x.shape[1])) <= 4 * TOL[np.dtype(np.float32)]
    g = lambda x, **kw: cynorm.batch_norm(x, None, None, training=True, mask=mask, **kw)  # noqa: E731
    y = run(n_threads, g, x)
    assert not y[~mask].any()


def layer_norm_backward_inputs(rng, shape):
    """float32 x (hostile), grad_out, weight and the forward's saved mean and rstd."""
    x = hostile(rng, shape, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 2, shape[1]).astype(np.float32)
    _, mean, rstd = cynorm.layer_norm(x, shape[1], w, return_stats=True)
    return x, g, w, mean, rstd


@pytest.mark.parametrize("shape", [(1100, 2048), (3100, 2048), (1100, 2049)])
def test_layer_norm_backward(rng, shape):
    # rows of 2048 floats are all aligned alike: their dx is streamed after a few elements one
    # at a time; rows of 2049 are not (normal stores)
    x, g, w, mean, rstd = layer_norm_backward_inputs(rng, shape)
    ref = reference_norm_backward(g, x, (1,), w, (shape[1],))
    for n in (1, 2):
        with cynorm.num_threads(n):
            got = cynorm.layer_norm_backward(g, x, mean, rstd, shape[1], w, np.zeros_like(w))
        for a, r in zip(got, ref):
            assert a.dtype == np.float32 and rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("isa", _isa.available())
def test_layer_norm_backward_dx_does_not_depend_on_where_it_lies(rng, isa):
    # dx streamed from each row's 32-byte boundary on (one thread, 9 MB): the elements before
    # and after the whole vectors once rounded differently from the rest (a multiply-add fused
    # in one place and not the other), so dx changed in its last bit with its address
    kernels = _isa.load(isa)
    M, D = 1100, 2048
    x, g, w, mean, rstd = layer_norm_backward_inputs(rng, (M, D))
    buf = np.empty(M * D + 8, np.float32)
    first = None
    for offset in range(8):
        dx = buf[offset:offset + M * D].reshape(M, D)
        dx.fill(np.nan)
        kernels.layer_norm_backward(g, x, dx, D, w, mean, rstd, None, None, 1)
        if first is None:
            first = dx.copy()
        np.testing.assert_array_equal(dx, first, err_msg=f"dx {offset} floats off")


@pytest.mark.parametrize("shape", [(1101, 2048), (1103, 2043), (37, 13)])
def test_layer_norm_backward_dx_same_bits_every_way(rng, shape):
    # each row's dx the same bits on 1 and 2 threads (streamed or not, in a group of four rows
    # or on its own), with or without a padding mask
    x, g, w, mean, rstd = layer_norm_backward_inputs(rng, shape)
    keep = rng.random(shape[0]) < 0.7
    results = []
    for n in (1, 2):
        with cynorm.num_threads(n):
            results.append(cynorm.layer_norm_backward(g, x, mean, rstd, shape[1], w)[0][keep])
            results.append(cynorm.layer_norm_backward(g, x, mean, rstd, shape[1], w,
                                                      mask=keep)[0][keep])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((1100, 2048), 1), ((3100, 2048), 1), ((1100, 2049), 1),
                                        ((1100, 2, 1027), 1), ((275, 4, 2048), -1)])
def test_batch_norm_backward(rng, shape, axis, training):
    # dx is streamed on one thread from 8 MiB up to 24 MiB (the first shape); by columns (eval)
    # only where the rows align alike, and by rows (eval) never
    x = hostile(rng, shape, np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    other = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    rm = np.float32(x.mean(other) + 0.1 * x.std(other))
    rv = np.float32(x.var(other) * 1.5)
    _, mean, invstd = cynorm.batch_norm(x, rm, rv, w, None, training, axis=axis,
                                        return_stats=True)
    pshape = [1] * x.ndim
    pshape[axis] = C
    if training:
        ref = reference_norm_backward(g, x, other, w, pshape[1:] if axis == 1 else (C,))
    else:   # the statistics are constants: dx = g·w·invstd
        ref = reference_eval_backward(g, x, mean, invstd, w, axis)
    for n in (1, 2):
        with cynorm.num_threads(n):
            got = cynorm.batch_norm_backward(g, x, mean, invstd, w, training, axis=axis,
                                             bias=np.zeros_like(w))
        for a, r in zip(got, ref):
            assert a.dtype == np.float32 and rel_err(a, r) <= 1e-5
