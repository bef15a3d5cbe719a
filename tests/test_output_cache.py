"""The output cache: large outputs reuse freed buffers, never stale data, bounded memory."""
import contextlib
import pickle
import threading

import numpy as np
import pytest

import cynorm
from cynorm._config import default_output_cache
from conftest import TOL, at_phase, reference_norm

MIN = cynorm.output_cache_info()["min_size"]


def address(a):
    return a.__array_interface__["data"][0]


@contextlib.contextmanager
def output_cache(nbytes):
    before = cynorm.set_output_cache(nbytes)
    try:
        yield
    finally:
        cynorm.set_output_cache(before)


def large(rng, dtype=np.float32, rows=None, cols=512):
    """Fresh data of (rows, cols) well above the cache's threshold, far from zero."""
    rows = rows or 4 * MIN // (cols * np.dtype(dtype).itemsize)
    return (rng.standard_normal((rows, cols)) * 3 + 1e3).astype(dtype)


def copy_at_phase(a, phase):
    """A copy of a whose data starts `phase` bytes into a 64-byte cache line."""
    b = at_phase(a, phase)
    b[...] = a
    return b


def test_a_freed_output_is_reused_and_is_an_ordinary_array(rng):
    x = large(rng)
    with output_cache(1 << 30):
        cynorm.set_output_cache(0)  # start empty
        cynorm.set_output_cache(1 << 30)
        y = cynorm.layer_norm(x, x.shape[1])
        first = address(y)
        assert y.flags.owndata and y.base is None and y.flags.c_contiguous
        assert first % 64 == address(x) % 64  # where x starts in its cache line
        info = cynorm.output_cache_info()
        del y
        held = cynorm.output_cache_info()
        assert held["blocks"] == info["blocks"] + 1 and held["held"] >= x.nbytes
        y = cynorm.layer_norm(x, x.shape[1])
        assert address(y) == first
        assert cynorm.output_cache_info()["hits"] == info["hits"] + 1
        np.testing.assert_allclose(y, reference_norm(x, (1,)), atol=TOL[x.dtype], rtol=0)
        # what NumPy does with its own arrays works on these
        z = pickle.loads(pickle.dumps(y))
        np.testing.assert_array_equal(z, y)
        y.resize((y.shape[0] * 2, y.shape[1]), refcheck=False)  # realloc through the handler
        np.testing.assert_array_equal(y[: x.shape[0]], z)
        y.resize((3, x.shape[1]), refcheck=False)
        np.testing.assert_array_equal(y, z[:3])


def test_small_outputs_do_not_use_it(rng):
    x = rng.standard_normal((64, 128)).astype(np.float32)
    before = cynorm.output_cache_info()
    for _ in range(5):
        cynorm.layer_norm(x, 128)
        cynorm.batch_norm(x, training=True)
    after = cynorm.output_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_reused_buffers_never_leak_old_values(rng):
    """Each fresh output is written in full: a buffer last holding NaN comes back as the
    reference's answer, for every function that allocates one, with and without padding."""
    N, T, C = 8, MIN // (8 * 256 * 4) * 2, 256
    x = (rng.standard_normal((N, T, C)) * 2 + 50).astype(np.float32)
    lengths = rng.integers(1, T, N)
    lengths[0] = T
    mask = np.arange(T)[None, :] < lengths[:, None]
    poison = copy_at_phase(np.full_like(x, np.nan), address(x) % 64)  # x's place in its line
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    real = x[mask]
    calls = {
        "layer_norm": (lambda: cynorm.layer_norm(x, C, w, b),
                       reference_norm(x, (2,), w, b)),
        "layer_norm masked": (
            lambda: cynorm.layer_norm(x, C, w, b, lengths=lengths),
            np.where(mask[..., None], reference_norm(x, (2,), w, b), 0.0)),
        "batch_norm training": (
            lambda: cynorm.batch_norm(x, weight=w, bias=b, training=True, axis=-1),
            reference_norm(x, (0, 1), w, b)),
        "batch_norm masked": (
            lambda: cynorm.batch_norm(x, weight=w, bias=b, training=True, axis=-1, mask=mask),
            None),
        "batch_norm eval masked": (
            lambda: cynorm.batch_norm(x, np.zeros(C, np.float32), np.ones(C, np.float32),
                                      training=False, axis=-1, mask=mask),
            np.where(mask[..., None], x / np.sqrt(1 + 1e-5), 0.0)),
    }
    expected_masked = np.zeros(x.shape)
    expected_masked[mask] = reference_norm(real, (0,), w, b)
    calls["batch_norm masked"] = (calls["batch_norm masked"][0], expected_masked)
    with output_cache(1 << 30):
        for name, (call, expected) in calls.items():
            cynorm.set_output_cache(0)
            cynorm.set_output_cache(1 << 30)
            garbage = cynorm.layer_norm(poison, C)  # a cached buffer full of NaN
            assert np.isnan(garbage).all()
            where = address(garbage)
            del garbage
            y = call()
            assert address(y) == where, name  # the test is about a reused buffer
            np.testing.assert_allclose(y, expected, atol=2e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("dtype, phases", [(np.float32, (0, 4, 16, 48, 60)),
                                           (np.float64, (8, 40, 0))])
def test_outputs_start_where_the_input_starts_in_its_line(rng, dtype, phases):
    # the streaming stores were up to 2.4x slower with an output placed otherwise in its line
    # than its input; one held buffer is handed out again at each phase
    x0 = large(rng, dtype)
    w = rng.uniform(0.5, 2, x0.shape[1]).astype(dtype)
    with output_cache(1 << 30):
        cynorm.set_output_cache(0)  # start empty
        cynorm.set_output_cache(1 << 30)
        for phase in phases:
            x = copy_at_phase(x0, phase)
            g = copy_at_phase(x0[::-1], phase)
            y, mean, rstd = cynorm.layer_norm(x, x.shape[1], w, return_stats=True)
            assert address(y) % 64 == phase and y.flags.aligned and y.flags.owndata
            np.testing.assert_allclose(y, reference_norm(x, (1,), w), atol=TOL[x.dtype], rtol=0)
            dx = cynorm.layer_norm_backward(g, x, mean, rstd, x.shape[1], w)[0]
            assert address(dx) % 64 == phase
            del y, dx
            z = cynorm.batch_norm(x, training=True, axis=-1)
            assert address(z) % 64 == phase
            np.testing.assert_allclose(z, reference_norm(x, (0,)), atol=TOL[x.dtype], rtol=0)
        assert cynorm.output_cache_info()["hits"] >= 3 * len(phases) - 2


def test_an_input_unaligned_for_its_items_gives_an_aligned_output(rng):
    x0 = large(rng, np.float64)
    x = copy_at_phase(x0, 4)  # float64 data 4 bytes into a line: NumPy calls it unaligned
    assert not x.flags.aligned
    y = cynorm.layer_norm(x, x.shape[1])
    assert y.flags.aligned and address(y) % 8 == 0
    np.testing.assert_allclose(y, reference_norm(x0, (1,)), atol=TOL[x.dtype], rtol=0)


def test_backward_outputs_come_from_it_too(rng):
    x = large(rng, np.float64)
    g = rng.standard_normal(x.shape)
    with output_cache(1 << 30):
        cynorm.set_output_cache(0)  # start empty
        cynorm.set_output_cache(1 << 30)
        y, mean, rstd = cynorm.layer_norm(x, x.shape[1], return_stats=True)
        dx1 = cynorm.layer_norm_backward(g, x, mean, rstd, x.shape[1])[0]
        before = cynorm.output_cache_info()["hits"]
        where = address(dx1)
        expected = dx1.copy()
        del dx1
        dx2 = cynorm.layer_norm_backward(g, x, mean, rstd, x.shape[1])[0]
        assert cynorm.output_cache_info()["hits"] == before + 1 and address(dx2) == where
        np.testing.assert_array_equal(dx2, expected)


def test_the_limit_bounds_what_it_holds(rng):
    with output_cache(3 * MIN):
        arrays = [cynorm.layer_norm(large(rng, rows=MIN // 2048 + k), 512) for k in range(6)]
        sizes = [a.nbytes for a in arrays]
        del arrays
        info = cynorm.output_cache_info()
        assert info["held"] <= 3 * MIN and info["blocks"] <= 3
        assert info["held"] >= min(sizes)  # the last ones freed are kept
        cynorm.set_output_cache(MIN // 2)  # below every block: all freed at once
        info = cynorm.output_cache_info()
        assert info["held"] == 0 and info["blocks"] == 0
    with output_cache(1 << 40):  # many sizes: at most 8 blocks, the oldest dropped
        arrays = [cynorm.layer_norm(large(rng, rows=MIN // 2048 * (k + 1)), 512)
                  for k in range(12)]
        del arrays
        assert cynorm.output_cache_info()["blocks"] <= 8


def test_off_gives_the_same_results(rng):
    x = large(rng)
    with output_cache(0):
        off = cynorm.batch_norm(x, training=True), cynorm.layer_norm(x, 512)
        assert cynorm.output_cache_info()["held"] == 0
    with output_cache(1 << 30):
        on = cynorm.batch_norm(x, training=True), cynorm.layer_norm(x, 512)
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a, b)


def test_bad_limit_is_an_error():
    with pytest.raises(ValueError, match="output cache limit"):
        cynorm.set_output_cache(-1)


def test_concurrent_threads_share_it_safely(rng):
    xs = [large(rng) for _ in range(4)]
    expected = [cynorm.layer_norm(x, 512) for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(10):
                y = cynorm.layer_norm(xs[k], 512)
                if not np.array_equal(y, expected[k]):
                    errors.append(k)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with output_cache(6 * xs[0].nbytes):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("268435456", 1 << 28), ("256M", 256 << 20), ("2g", 2 << 30), ("64K", 64 << 10),
])
def test_environment_variable(monkeypatch, value, expected):
    monkeypatch.setenv("CYNORM_OUTPUT_CACHE", value)
    assert default_output_cache() == expected


@pytest.mark.parametrize("value", ["-1", "lots", "1.5G", "M"])
def test_bad_environment_variable(monkeypatch, value):
    monkeypatch.setenv("CYNORM_OUTPUT_CACHE", value)
    with pytest.raises(ValueError, match="CYNORM_OUTPUT_CACHE"):
        default_output_cache()


def test_default_is_bounded(monkeypatch):
    monkeypatch.delenv("CYNORM_OUTPUT_CACHE", raising=False)
    assert 0 < default_output_cache() <= 1 << 30
