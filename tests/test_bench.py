"""The benchmark report machinery (not speed: speed is measured in benchmarks/, never asserted)."""
import json

import numpy as np
import pytest

from conftest import optional
from cynorm import bench


def test_grid():
    quick = bench.cases()
    full = bench.cases(full=True)
    assert {c.op for c in quick} == set(bench.OPS)
    assert len(full) > len(quick) and {c.dtype for c in full} == {"float32", "float64"}
    assert all(c.size_class == "small" for c in bench.cases(sizes=["small"]))
    case = bench.Case("bn_train", (16384, 4096), "float32")
    assert case.bytes_moved == 3 * case.nbytes and case.size_class == "large"
    assert bench.Case("ln", (16384, 4096), "float32").bytes_moved == 2 * case.nbytes


@pytest.mark.parametrize("case", [bench.Case("ln", (64, 128), "float32", -1),
                                  bench.Case("bn_train", (8, 6, 70), "float64", 1),
                                  bench.Case("bn_eval", (8, 5, 9), "float32", -1),
                                  bench.Case("ln_bwd", (16, 40), "float64", -1),
                                  bench.Case("bn_bwd_train", (8, 4, 100), "float64", 1),
                                  bench.Case("bn_bwd_train", (64, 7), "float32", 1),
                                  bench.Case("bn_bwd_eval", (6, 5, 7), "float64", -1)],
                         ids=lambda c: c.id)
def test_contenders_compute_the_same_thing(case, torch):
    fns = bench.contenders(case, torch)
    results = {name: fn() for name, fn in fns.items()}
    for name, got in results.items():
        got = got if isinstance(got, tuple) else (got,)
        ref = results["numpy"] if isinstance(results["numpy"], tuple) else (results["numpy"],)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", [c for op in bench.OPS
                                  for c in bench.cases(ops=[op], sizes=["small"])[:1]]
                         + [bench.Case("moments", (300, 7), "float64"),
                            bench.Case("scaler", (300, 7), "float32")], ids=lambda c: c.id)
def test_case_lists_its_contenders(case, torch):
    assert tuple(bench.contenders(case, torch)) == case.contenders


def test_table_contenders_compute_the_same_thing(torch):
    optional("sklearn")
    fns = bench.contenders(bench.Case("moments", (500, 9), "float64"), torch)
    m = fns["cynorm"]()
    mean, var = fns["numpy"]()
    tv, tm = fns["torch"]()
    for other_mean, other_var in ((mean, var), (tm.numpy(), tv.numpy())):
        np.testing.assert_allclose(m.mean, other_mean, rtol=1e-12)
        np.testing.assert_allclose(m.var(), other_var, rtol=1e-10)
    fns = bench.contenders(bench.Case("scaler", (500, 9), "float32"), torch)
    np.testing.assert_allclose(fns["cynorm"](), fns["sklearn"](), atol=2e-5)


def test_run_and_report(tmp_path):
    grid = [bench.Case("ln", (5, 10), "float32", -1), bench.Case("bn_eval", (64, 128), "float32")]
    info, results = bench.run(grid, threads=1, rounds=3, use_torch=False, progress=False)
    assert info["threads"] == 1 and info["torch"] is not None or info["torch"] is None
    assert [r["case"] for r in results] == [c.id for c in grid]
    assert all(r["times"]["cynorm"] > 0 and r["times"]["numpy"] > 0 for r in results)
    path = bench.write_report(info, results, str(tmp_path / "report"))
    text = open(path).read()
    assert "LN forward (5, 10) float32" in text and "## Machine" in text
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["results"][0]["case"] == "ln-5x10-float32"


@pytest.mark.parametrize("warm", [False, True])
def test_timed_interleaves_and_warms(monkeypatch, warm):
    # rounds interleave the contenders; warm adds one untimed call before each sample
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    monkeypatch.setattr(bench, "_calibrate", lambda fn: (2, 1e-3))  # two timed calls per sample
    times = bench.timed(fns, rounds=3, warm=warm)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    sample = ["a"] * (2 + warm) + ["b"] * (2 + warm)
    assert calls == ["a", "b"] + sample * 3


def test_timed_repeats_the_fast_contenders_within_a_round(monkeypatch):
    # "fast" costs a twentieth of "slow": capped at 3 samples per round, in sub-rounds
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("slow", "fast")}
    cost = {fns["slow"]: 1.0, fns["fast"]: 0.05}
    monkeypatch.setattr(bench, "_calibrate", lambda fn: (1, cost[fn]))
    bench.timed(fns, rounds=2, max_repeats=3)
    assert calls == ["slow", "fast"] + ["slow", "fast", "fast", "fast"] * 2
    calls.clear()
    bench.timed(fns, rounds=2)  # by default one sample per round
    assert calls == ["slow", "fast"] + ["slow", "fast"] * 2


def test_the_quick_grid_plots_each_curve_up_to_a_large_input():
    # time_vs_size.png follows LN forward and BN training over (N, C) shapes
    for op in ("ln", "bn_train"):
        plotted = [c for c in bench.cases(ops=[op]) if len(c.shape) == 2]
        assert {c.size_class for c in plotted} == {"small", "medium", "large"}
