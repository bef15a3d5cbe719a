import os

import numpy as np
import pytest

from cynorm import bench

FULL = os.environ.get("CYNORM_BENCH_FULL", "0") not in ("", "0")
GRID = bench.cases(full=FULL)


# ONNX Runtime and JAX rows where the peer is installed and has the op.  JAX's thread pool
# slows every OpenMP contender that runs after it in the same process, so its rows come last.
INSTALLED = bench.peers.installed()
PEER_OPS = {"onnxruntime": bench.peers.ONNX_OPS, "jax": bench.peers.JAX_OPS}


def _peer_rows(case, peer):
    if peer == "onnxruntime":
        return peer in INSTALLED and bench.peers.onnx_supports(case)
    return peer in INSTALLED and case.op in PEER_OPS[peer]


PAIRS = [pytest.param(case, name, id=f"{case.id}-{name}") for case in GRID
         for name in case.contenders + (("memory_copy",) if case.size_class != "small" else ())
         + (("onnxruntime",) if _peer_rows(case, "onnxruntime") else ())]
PAIRS += [pytest.param(case, "jax", id=f"{case.id}-jax") for case in GRID
          if _peer_rows(case, "jax")]


@pytest.mark.parametrize("case,contender", PAIRS)
def test_speed(benchmark, torch_or_none, case, contender):
    benchmark.group = case.label
    benchmark.extra_info.update(case=case.id, size_class=case.size_class, nbytes=case.nbytes,
                                bytes_moved=case.bytes_moved)
    if contender == "memory_copy":
        src = np.random.default_rng(0).standard_normal(case.nbytes // 8)
        dst = np.empty_like(src)

        def fn():
            np.copyto(dst, src)
    else:
        if contender == "torch" and torch_or_none is None:
            pytest.skip("torch is not installed: its rows are left out")
        peers = bench.peers.in_process([contender]) if contender in PEER_OPS else None
        fn = bench.contenders(case, torch_or_none, peers=peers)[contender]
    if case.size_class == "large":
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1)
    else:
        benchmark(fn)
