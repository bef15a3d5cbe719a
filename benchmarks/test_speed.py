import os

import numpy as np
import pytest

from cynorm import bench

FULL = os.environ.get("CYNORM_BENCH_FULL", "0") not in ("", "0")
GRID = bench.cases(full=FULL)


PAIRS = [pytest.param(case, name, id=f"{case.id}-{name}") for case in GRID
         for name in case.contenders + (("memory_copy",) if case.size_class != "small" else ())]


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
        fn = bench.contenders(case, torch_or_none)[contender]
    if case.size_class == "large":
        benchmark.pedantic(fn, rounds=7, warmup_rounds=1)
    else:
        benchmark(fn)
