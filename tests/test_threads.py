import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cynorm


def test_set_num_threads_and_context():
    default = cynorm.get_num_threads()
    assert default >= 1
    try:
        cynorm.set_num_threads(1)
        assert cynorm.get_num_threads() == 1
        with cynorm.num_threads(3):
            assert cynorm.get_num_threads() == 3
        assert cynorm.get_num_threads() == 1
    finally:
        cynorm.set_num_threads(None)
    assert cynorm.get_num_threads() == default
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError):
            cynorm.set_num_threads(bad)


def _run(code, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def test_omp_num_threads_is_honoured():
    r = _run("import cynorm; print(cynorm.get_num_threads())", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_threadpoolctl_limits_are_honoured():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, "openmp"):
        assert cynorm.get_num_threads() == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_does_not_hang():
    # The parent runs threaded kernels (starting libgomp's team), then forks; the child must run
    # kernels to completion. A hang shows up as the subprocess timing out.
    code = """
        import multiprocessing as mp, numpy as np, cynorm
        x = np.random.default_rng(0).standard_normal((2000, 512)).astype(np.float32)
        cynorm.set_num_threads(2)
        expect_ln = cynorm.layer_norm(x, 512)
        expect_bn = cynorm.batch_norm(x, training=True)

        def work(q):
            cynorm.set_num_threads(2)  # asking for threads in a forked child must not hang
            q.put((cynorm.get_num_threads(),
                   float(np.abs(cynorm.layer_norm(x, 512) - expect_ln).max()),
                   float(np.abs(cynorm.batch_norm(x, training=True) - expect_bn).max())))

        ctx = mp.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=work, args=(q,)) for _ in range(2)]
        for p in procs: p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs: p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        assert all(r[0] == 1 and r[1] < 1e-5 and r[2] < 1e-5 for r in results), results
        # the parent keeps its threads
        assert cynorm.get_num_threads() == 2
        print("ok")
    """
    r = _run(code, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("ok")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_other_threads_are_inside_kernels():
    # Two Python threads keep OpenMP teams busy in LayerNorm and BatchNorm kernels while the
    # main thread forks, again and again; every child runs kernels and exits, none hangs.
    code = """
        import os, sys, threading, time
        import numpy as np, cynorm
        x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
        expect_ln = cynorm.layer_norm(x[:128], 2048)
        expect_bn = cynorm.batch_norm(x[:128], training=True)
        stop = threading.Event()
        calls = [0, 0]

        def spin(k):
            while not stop.is_set():
                cynorm.layer_norm(x, 2048) if k == 0 else cynorm.batch_norm(x, training=True)
                calls[k] += 1

        workers = [threading.Thread(target=spin, args=(k,)) for k in (0, 1)]
        for t in workers: t.start()
        time.sleep(0.1)
        for i in range(8):
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    ok = (cynorm.get_num_threads() == 1
                          and np.abs(cynorm.layer_norm(x[:128], 2048) - expect_ln).max() < 1e-5
                          and np.abs(cynorm.batch_norm(x[:128], training=True)
                                     - expect_bn).max() < 1e-5)
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            deadline = time.time() + 60
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.time() > deadline:
                    os.kill(pid, 9)
                    print("child", i, "hung"); sys.exit(1)
                time.sleep(0.005)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (i, status)
            time.sleep(0.02)
        stop.set()
        for t in workers: t.join(60)
        assert min(calls) > 0, calls
        print("ok", calls)
    """
    r = _run(code, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout


def test_threads_from_python_threads_agree(rng):
    from concurrent.futures import ThreadPoolExecutor
    xs = [rng.standard_normal((300, 256)).astype(np.float32) for _ in range(8)]
    expect = [cynorm.layer_norm(x, 256) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: cynorm.layer_norm(x, 256), xs))
    for a, b in zip(expect, got):
        np.testing.assert_array_equal(a, b)
