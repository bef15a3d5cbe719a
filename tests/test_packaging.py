"""The installed package: metadata, type stubs, OpenMP runtimes side by side."""
import importlib
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import cynorm
from cynorm import _isa


def test_version_is_single_sourced():
    assert cynorm.__version__ == importlib.metadata.version("cynorm")


def test_typing_files_ship_with_the_package():
    pkg = pathlib.Path(cynorm.__file__).parent
    assert (pkg / "py.typed").exists()
    for name in ("_kernels", "_kernels_avx2", "_kernels_avx512"):
        assert (pkg / f"{name}.pyi").exists(), name


def test_stubs_match_the_compiled_modules():
    pytest.importorskip("mypy")
    modules = ["cynorm._runtime"] + [f"cynorm.{_isa.LEVELS[name][1]}" for name in _isa.available()]
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", *modules], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_front_end_is_compiled_from_the_current_sources():
    # setup.py compiles the Python front end (argument checks, dispatch) from its .py files;
    # Python imports the compiled module, so one older than its source would run stale code
    # (an editable install not rebuilt after an edit).
    from cynorm import _config, functional

    compiled = _config.compiled_front_end()
    assert {"functional", "_validation", "layers"} <= set(compiled), compiled
    assert not functional.__file__.endswith(".py")
    pkg = pathlib.Path(cynorm.__file__).parent
    in_tree = (pkg.parent / "setup.py").exists()  # a wheel's files get install-time mtimes
    for name in compiled:
        mod = importlib.import_module(f"cynorm.{name}")
        built = pathlib.Path(mod.__file__)
        assert built.suffix != ".py", name
        assert not in_tree or built.stat().st_mtime >= (pkg / f"{name}.py").stat().st_mtime, (
            f"cynorm/{name}.py is newer than its compiled module: rebuild (pip install -e .)")


def test_import_cynorm_leaves_the_optional_dependencies_alone():
    r = _run("""
        import sys
        import cynorm
        cynorm.moments(cynorm.layer_norm([[1.0, 2.0], [3.0, 5.0]], 2), 0)
        loaded = [m for m in ("torch", "dask", "distributed", "sklearn") if m in sys.modules]
        assert not loaded, loaded
    """)
    assert r.returncode == 0, r.stdout + r.stderr


def _run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("first", ["torch", "cynorm"])
def test_torch_and_cynorm_in_one_process(torch, first):
    # Each brings its own OpenMP runtime (torch's bundled libgomp, cynorm's): either import
    # order, both used in turn and from threads, must neither crash nor hang nor ask for more
    # threads than the machine has.
    second = "cynorm" if first == "torch" else "torch"
    code = f"""
        import os
        import {first}, {second}
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor
        x = np.random.default_rng(0).standard_normal((2048, 512)).astype(np.float32)
        for _ in range(3):
            a = cynorm.layer_norm(x, 512)
            b = torch.nn.functional.layer_norm(torch.from_numpy(x), (512,)).numpy()
            assert np.abs(a - b).max() < 1e-4
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(cynorm.batch_norm, x, training=True),
                       pool.submit(lambda: torch.nn.functional.batch_norm(
                           torch.from_numpy(x), None, None, training=True))]
            [f.result(timeout=60) for f in futures]
        cpus = len(os.sched_getaffinity(0))
        assert cynorm.get_num_threads() <= cpus and torch.get_num_threads() <= cpus
        print("ok")
    """
    r = _run(code)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "ok"


def test_threadpoolctl_sees_and_limits_cynorm_openmp():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cynorm import _runtime
    from cynorm._isa import kernels
    from cynorm._threads import _CPU_LIMIT

    if not kernels.openmp_enabled():
        pytest.skip("built without OpenMP")
    info = [p for p in threadpoolctl.threadpool_info() if p["internal_api"] == "openmp"]
    assert info, threadpoolctl.threadpool_info()
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            mapped = f.read()
        assert any(p["filepath"] in mapped for p in info)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cynorm.get_num_threads() == 1
    assert cynorm.get_num_threads() == min(_runtime.omp_max_threads(), _CPU_LIMIT)
