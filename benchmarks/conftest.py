"""pytest-benchmark suite: every case of cynorm.bench, one group per case, with cynorm (fresh
output and out=), the NumPy expression, torch on CPU, ONNX Runtime and JAX where installed and
the case has the op, and a same-size memory copy side by side.  The JAX rows run last: once
XLA's pool has run, it may slow the OpenMP contenders after it in the same process.

    pip install -e ".[bench,peers]" torch==2.13.0 && python -m pytest benchmarks

CYNORM_BENCH_FULL=1 runs the whole grid (every shape, float32 and float64).
"""
import os

import pytest


@pytest.fixture(scope="session")
def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    import cynorm

    torch.set_num_threads(cynorm.get_num_threads())
    return torch


def pytest_benchmark_update_machine_info(config, machine_info):
    from cynorm._config import config_info

    machine_info["cynorm"] = config_info()
    try:
        import torch

        machine_info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        machine_info["torch"] = None


def pytest_report_header(config):
    from cynorm._config import config_info

    info = config_info()
    full = os.environ.get("CYNORM_BENCH_FULL", "0") not in ("", "0")
    return (f"cynorm {info['cynorm']}: {info['isa']} kernels, OpenMP {info['openmp']}, "
            f"{info['threads']} threads; grid: {'full' if full else 'quick'}")
