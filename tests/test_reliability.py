"""Threads and memory: concurrent training calls, no growth over many calls."""
import gc
import os
import threading
import tracemalloc

import numpy as np
import pytest

import cynorm


def test_concurrent_training_on_one_batch_norm(rng):
    # momentum=None is the cumulative average: the result does not depend on the order of the
    # batches, so concurrent training must equal sequential training up to rounding.
    batches = [rng.standard_normal((20000, 8)) * (k + 1) + k for k in range(40)]
    sequential = cynorm.BatchNorm1d(8, momentum=None, dtype=np.float64)
    for x in batches:
        sequential(x)
    shared = cynorm.BatchNorm1d(8, momentum=None, dtype=np.float64)
    errors = []

    def work(chunk):
        try:
            for x in chunk:
                shared(x)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(batches[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert int(shared.num_batches_tracked) == len(batches)
    np.testing.assert_allclose(shared.running_mean, sequential.running_mean, rtol=1e-10)
    np.testing.assert_allclose(shared.running_var, sequential.running_var, rtol=1e-10)


def test_no_memory_growth_over_many_calls(rng):
    x = rng.standard_normal((16, 32)).astype(np.float32)
    g = np.ones_like(x)
    rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
    w, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    lengths = np.array([3, 1, 0, 2])
    seq = x.reshape(4, 4, 32)

    def calls():
        _, m, r = cynorm.layer_norm(x, 32, w, b, return_stats=True)
        cynorm.layer_norm_backward(g, x, m, r, 32, w, b)
        _, m, i = cynorm.batch_norm(x, rm, rv, w, b, True, return_stats=True)
        cynorm.batch_norm_backward(g, x, m, i, w, True, bias=b)
        cynorm.batch_norm(x, rm, rv, w, b, False)
        cynorm.layer_norm(seq, 32, lengths=lengths)
        cynorm.batch_norm(seq, training=True, axis=-1, lengths=lengths)

    for _ in range(200):  # warm caches and lazy imports
        calls()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(5000):
        calls()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert growth < 64 * 1024, growth


def test_concurrent_calls_agree_with_sequential_ones(rng):
    # different inputs on 4 Python threads at once, big enough to use the OpenMP teams too
    xs = [rng.standard_normal((256, 1024)).astype(dt) for dt in (np.float32, np.float64) * 3]
    g = [np.ones_like(x) for x in xs]

    def work(i):
        x = xs[i]
        y, m, r = cynorm.layer_norm(x, 1024, return_stats=True)
        z, bm, bi = cynorm.batch_norm(x, training=True, return_stats=True)
        return (y, z, cynorm.layer_norm_backward(g[i], x, m, r, 1024)[0],
                cynorm.batch_norm_backward(g[i], x, bm, bi)[0],
                cynorm.batch_norm(x.reshape(16, 16, 1024), training=True, axis=-1,
                                  lengths=np.arange(16) + 1),
                cynorm.moments(x, 0).var())

    expected = [work(i) for i in range(len(xs))]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(work, range(len(xs))))
            for a, b in zip(got, expected):
                for u, v in zip(a, b):
                    np.testing.assert_array_equal(u, v)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _public_calls(rng):
    """One small call of every public function and layer method, by name."""
    x = rng.standard_normal((16, 32)).astype(np.float32)
    g = np.ones_like(x)
    seq = x.reshape(4, 4, 32)
    lengths = np.array([3, 1, 0, 2])
    rm, rv = np.zeros(32, np.float32), np.ones(32, np.float32)
    w, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    _, m, r = cynorm.layer_norm(x, 32, w, b, return_stats=True)
    _, bm, bi = cynorm.batch_norm(x, rm, rv, w, b, True, return_stats=True)
    ln, bn = cynorm.LayerNorm(32), cynorm.BatchNorm1d(32)
    part = cynorm.moments(x, 0)
    return {
        "layer_norm": lambda: cynorm.layer_norm(x, 32, w, b),
        "layer_norm masked": lambda: cynorm.layer_norm(seq, 32, lengths=lengths),
        "batch_norm train": lambda: cynorm.batch_norm(x, rm, rv, w, b, True),
        "batch_norm eval": lambda: cynorm.batch_norm(x, rm, rv, w, b, False),
        "batch_norm masked": lambda: cynorm.batch_norm(seq, training=True, axis=-1,
                                                       lengths=lengths),
        "layer_norm_backward": lambda: cynorm.layer_norm_backward(g, x, m, r, 32, w, b),
        "batch_norm_backward": lambda: cynorm.batch_norm_backward(g, x, bm, bi, w, True, bias=b),
        "LayerNorm forward+backward": lambda: (ln(x), ln.backward(g)),
        "BatchNorm forward+backward": lambda: (bn(x), bn.backward(g)),
        "BatchNorm.partial_fit": lambda: bn.partial_fit(x),
        "moments": lambda: cynorm.moments(x, 0),
        "Moments.merge": lambda: part.merge(part).var(1),
    }


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_rss_growth_over_a_hundred_thousand_calls_each(rng):
    grown = {}
    for name, fn in _public_calls(rng).items():
        for _ in range(10_000):  # warm up: caches, allocator arenas
            fn()
        gc.collect()
        before = _rss_bytes()
        for _ in range(100_000):
            fn()
        gc.collect()
        grown[name] = _rss_bytes() - before
    print(grown)
    # a leak of even 40 bytes a call would show as 4 MB
    assert all(v < 4 << 20 for v in grown.values()), grown


def test_outputs_hold_no_reference_to_inputs(rng):
    x = rng.standard_normal((8, 16))
    for y in (cynorm.layer_norm(x, 16), cynorm.batch_norm(x, training=True)):
        assert y.base is None or not np.shares_memory(y, x)
