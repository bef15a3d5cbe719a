"""Threads and memory: concurrent training calls, no growth over many calls."""
import threading
import tracemalloc

import numpy as np

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


def test_outputs_hold_no_reference_to_inputs(rng):
    x = rng.standard_normal((8, 16))
    for y in (cynorm.layer_norm(x, 16), cynorm.batch_norm(x, training=True)):
        assert y.base is None or not np.shares_memory(y, x)
