"""The benchmark report machinery (not speed: speed is measured in benchmarks/, never asserted)."""
import json

import numpy as np
import pytest

from conftest import optional
from cynorm import bench


# the 16-bit cases (bfloat16 where ml_dtypes is installed: the test extra brings it)
HALF_CASES = [bench.Case(op, shape, dt, -1) for dt in bench.half_dtypes()
              for op, shape in [("ln", (16, 40)), ("rms", (3, 5, 64)), ("add_ln", (16, 48)),
                                ("add_rms", (16, 48)), ("ln_bwd", (16, 40)),
                                ("rms_bwd", (3, 5, 64))]] + [
    bench.Case(op, shape, dt, axis) for dt in bench.half_dtypes()
    for op, shape, axis in [("bn_train", (16, 40), 1), ("bn_eval", (8, 6, 70), 1),
                            ("bn_train", (4, 5, 12), -1), ("bn_bwd_train", (16, 40), 1),
                            ("bn_bwd_train", (4, 6, 70), 1), ("bn_bwd_eval", (4, 5, 12), -1),
                            ("gn", (2, 64, 3, 3), 1), ("in", (2, 5, 4, 8), -1),
                            ("gn_bwd", (2, 64, 3, 3), 1), ("gn_bwd", (2, 3, 4, 64), -1),
                            ("in_bwd", (2, 8, 30), 1)]]


def test_grid():
    quick = bench.cases()
    full = bench.cases(full=True)
    assert {c.op for c in quick} == set(bench.OPS)
    halves = set(bench.half_dtypes())
    assert len(full) > len(quick) and {c.dtype for c in full} == {"float32", "float64"} | halves
    assert {c.op for c in quick if c.dtype in halves} == set(bench.HALF_OPS)
    assert {c.dtype for c in bench.cases(dtypes=["float64"])} == {"float64"}
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
                                  bench.Case("bn_bwd_eval", (6, 5, 7), "float64", -1),
                                  bench.Case("rms", (16, 40), "float32", -1),
                                  bench.Case("add_ln", (4, 5, 40), "float64", -1),
                                  bench.Case("add_rms", (16, 40), "float32", -1),
                                  bench.Case("rms_bwd", (16, 40), "float64", -1)] + HALF_CASES,
                         ids=lambda c: c.id)
def test_contenders_compute_the_same_thing(case, torch):
    fns = bench.contenders(case, torch)
    results = {name: fn() for name, fn in fns.items()}
    for name, got in results.items():
        got = got if isinstance(got, tuple) else (got,)
        ref = results["numpy"] if isinstance(results["numpy"], tuple) else (results["numpy"],)
        assert len(got) == len(ref)
        tol = 1e-4 if case.dtype not in bench.HALF_DTYPES else _tolerance(case) / 4
        for a, b in zip(got, ref):
            a = a.float().numpy() if hasattr(a, "float") else np.asarray(a)
            b = np.asarray(b).astype(np.float64)
            # 16-bit: the parameter gradients are sums of many rounded terms, within the
            # tolerance of the largest gradient (a sum that cancels keeps that error)
            atol = tol if case.dtype not in bench.HALF_DTYPES else tol * max(1.0,
                                                                              np.abs(b).max())
            np.testing.assert_allclose(a.astype(np.float64), b, atol=atol, rtol=tol,
                                       err_msg=name)


@pytest.mark.parametrize("case", [bench.Case(op, (4, 6, 12), dt, -1)
                                  for op in ("bn_masked", "ln_masked")
                                  for dt in ("float32",) + bench.half_dtypes()],
                         ids=lambda c: c.id)
def test_masked_contenders_compute_their_own_things(case, torch):
    """A masked case's cynorm and NumPy contenders normalize the real tokens; its reference
    call and torch (which has no mask) compute the case's reference: in every dtype."""
    fns = bench.contenders(case, torch)
    results = {}
    for name, fn in fns.items():
        got = fn()
        got = got.float().numpy() if hasattr(got, "float") else got   # a torch tensor
        results[name] = np.asarray(got, dtype=np.float64)
    tol = 2e-4 if case.dtype == "float32" else _tolerance(case) / 4
    np.testing.assert_allclose(results["cynorm"], results["numpy"], atol=tol, rtol=tol)
    if "torch" in results:
        np.testing.assert_allclose(results["torch"], results["cynorm_reference"], atol=tol,
                                   rtol=tol)


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
def test_timed_interleaves_rotates_and_warms(monkeypatch, warm):
    # rounds interleave the contenders, each round starting one contender further on; warm
    # adds WARM_CALLS untimed calls before each sample
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    monkeypatch.setattr(bench.timing, "_calibrate", lambda fn: (2, 1e-3))  # two timed calls per sample
    times = bench.timed(fns, rounds=4, warm=warm)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    n = 2 + (bench.timing.WARM_CALLS if warm else 0)
    assert bench.timing.WARM_CALLS >= 2
    rounds = ["abc", "bca", "cab", "abc"]
    assert calls == ["a", "b", "c"] + [name for r in rounds for name in r for _ in range(n)]


def test_timed_repeats_the_fast_contenders_within_a_round(monkeypatch):
    # "fast" costs a twentieth of "slow": capped at 3 samples per round, in sub-rounds
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("slow", "fast")}
    cost = {fns["slow"]: 1.0, fns["fast"]: 0.05}
    monkeypatch.setattr(bench.timing, "_calibrate", lambda fn: (1, cost[fn]))
    bench.timed(fns, rounds=2, max_repeats=3)
    assert calls == ["slow", "fast"] + ["slow", "fast", "fast", "fast"] + ["fast", "slow",
                                                                           "fast", "fast"]
    calls.clear()
    bench.timed(fns, rounds=2)  # by default one sample per round
    assert calls == ["slow", "fast"] + ["slow", "fast"] + ["fast", "slow"]


def test_the_quick_grid_plots_each_curve_up_to_a_large_input():
    # time_vs_size.png follows LN forward and BN training over (N, C) shapes
    for op in ("ln", "bn_train"):
        plotted = [c for c in bench.cases(ops=[op]) if len(c.shape) == 2]
        assert {c.size_class for c in plotted} == {"small", "medium", "large"}


def _result(op, label, times, roof=None):
    r = {"op": op, "label": label, "times": times}
    if roof is not None:
        r["roof"] = roof
    return r


def test_the_table_says_how_to_read_it():
    rows = [_result("ln", "in cache", {"cynorm": 2.0, "cynorm_out": 1.0, "numpy": 8.0,
                                       "torch": 4.0}, roof=1.4),
            _result("ln", "streamed", {"cynorm": 2.0, "cynorm_out": 2.0, "numpy": 8.0,
                                       "torch": 4.0}, roof=1.0)]
    text = "\n".join(bench.table(rows))
    assert "| 1.40* |" in text and "| 0.50 |" in text  # only the one above 1 is starred
    assert "of roof: roof / cynorm out=" in text and "* above 1: faster than that copy" in text
    assert "above 1" not in "\n".join(bench.table(rows[1:])).split("1.00 is")[1]


def test_the_mask_table_says_which_targets_were_missed():
    met = _result("ln_masked", "LN masked", {"cynorm": 0.5, "cynorm_reference": 1.0})
    missed = _result("bn_masked", "BN masked", {"cynorm": 1.5, "cynorm_reference": 1.0})
    text = "\n".join(bench.mask_table([met, missed]))
    assert "| 0.50 | ≤ 0.60 | yes |" in text and "| 1.50 | ≤ 1.10 | **no** |" in text
    assert "A **no** is a real miss" in text and "torch has no mask" in text
    assert "A **no**" not in "\n".join(bench.mask_table([met]))


def test_plots_name_the_contenders_as_the_table_does(tmp_path):
    optional("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # what each saved figure shows
        for ax in fig.axes:
            shown.append(([t.get_text() for t in ax.get_yticklabels()],
                          [t.get_text() for t in ax.get_xticklabels()],
                          [t.get_text() for t in ax.texts] + [c.get_text() for c in
                                                              ax.get_children()
                                                              if hasattr(c, "get_text")],
                          ax.get_legend_handles_labels()[1]))
        return real_savefig(fig, *args, **kwargs)

    rows = [dict(_result("ln", f"LN {n}", {"cynorm": 1.0 * n, "cynorm_out": 0.9 * n,
                                           "numpy": 9.0 * n, "torch": 3.0 * n}, roof=0.5 * n),
                 dtype="float32", nbytes=n, axis=-1, shape=(n, 8)) for n in (1, 100)]
    rows.append(dict(_result("bn_masked", "BN masked", {"cynorm": 2.0, "numpy": 9.0,
                                                        "torch": 5.0, "cynorm_reference": 1.0}),
                     dtype="float32", nbytes=10, axis=-1, shape=(2, 2, 2)))
    plt.Figure.savefig = spy
    try:
        assert bench._plots(rows, str(tmp_path)) == ["speedup.png", "time_vs_size.png"]
    finally:
        plt.Figure.savefig = real_savefig
    (bars_y, bars_x, bar_texts, _), (_, _, _, curves) = shown
    assert any("torch: no mask, BN on the real tokens alone" in t for t in bars_y)
    assert "9.00×" in bar_texts and "2.50×" in bar_texts  # every bar carries its ratio
    assert len([t for t in bars_x if t]) >= 3
    assert "cynorm out=" in curves and "cynorm_out" not in curves


def test_the_command_line_explains_each_command_and_default():
    import subprocess
    import sys

    top = subprocess.run([sys.executable, "-m", "cynorm", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert top.returncode == 0
    from cynorm.__main__ import COMMANDS

    assert set(COMMANDS) == {"info", "bench", "demo"}
    flat = " ".join(top.stdout.split())
    for name, text in COMMANDS.items():
        assert f"{name} {text.split()[0]}" in flat and len(text.split()) > 5  # what it does
    sub = subprocess.run([sys.executable, "-m", "cynorm", "bench", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0
    assert sub.stdout.count("(default:") >= 7


PEER_CASES = [bench.Case("ln", (64, 128), "float32", -1), bench.Case("ln", (6, 9, 40), "float64", -1),
              bench.Case("bn_train", (64, 7), "float32", 1),
              bench.Case("bn_train", (8, 6, 70), "float64", 1),
              bench.Case("bn_eval", (8, 5, 9), "float32", 1),
              bench.Case("bn_eval", (8, 9, 5), "float32", -1),
              bench.Case("ln_bwd", (16, 40), "float64", -1),
              bench.Case("bn_bwd_train", (8, 4, 100), "float64", 1),
              bench.Case("bn_bwd_eval", (6, 5, 7), "float64", -1),
              bench.Case("moments", (300, 7), "float64"),
              bench.Case("rms", (3, 20, 64), "float32", -1),
              bench.Case("rms", (30, 64), "float64", -1),
              bench.Case("add_ln", (4, 9, 48), "float32", -1),
              bench.Case("add_ln", (30, 48), "float64", -1),
              bench.Case("add_rms", (30, 48), "float32", -1),
              bench.Case("rms_bwd", (30, 48), "float64", -1)] + HALF_CASES


def _tolerance(case):
    """float32 / float64: 2e-4; 16-bit: 8 units of the dtype's epsilon (JAX computes in it)."""
    if case.dtype in bench.HALF_DTYPES:
        return 8 * float(np.finfo(np.float16).eps if case.dtype == "float16" else 2.0 ** -7)
    return 2e-4


def _as_arrays(value):
    value = value if isinstance(value, (tuple, list)) else (value,)
    if hasattr(value[0], "mean") and hasattr(value[0], "var") and not hasattr(value[0], "shape"):
        return (value[0].mean, value[0].var())  # a cynorm.Moments
    return tuple(np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in value)


@pytest.mark.parametrize("case", PEER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("peer", ["onnxruntime", "jax"])
def test_peers_compute_what_numpy_does(case, peer):
    optional("onnxruntime" if peer == "onnxruntime" else "jax")
    fns = bench.contenders(case, None, peers=bench.peers.in_process([peer], threads=1))
    if peer == "onnxruntime":
        supported = bench.peers.onnx_supports(case)
    else:
        supported = case.op in bench.peers.JAX_OPS
    assert (peer in fns) == supported
    if not supported:
        return
    got, want = _as_arrays(fns[peer]()), _as_arrays(fns["numpy"]())
    n = min(len(got), len(want))  # (y) or (y, running mean, running var); (dx, dw, db)
    assert n >= 1
    tol = _tolerance(case)
    for a, b in zip(got[:n], want[:n]):
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=tol,
                                   rtol=tol)


def test_the_jax_worker_is_timed_like_any_contender():
    optional("jax")
    case = bench.Case("ln", (64, 128), "float32", -1)
    team = bench.Peers(["jax"], threads=1)
    try:
        fns = bench.contenders(case, None, peers=team)
        assert isinstance(fns["jax"], bench.peers._Remote)
        times = bench.timed(fns, rounds=3, warm=True)  # the worker's warm calls too
        assert set(times) == set(fns) and all(t > 0 for t in times.values())
        remote = _as_arrays(fns["jax"]())[0]
        local = bench.contenders(case, None, peers=bench.peers.in_process(["jax"], 1))["jax"]
        np.testing.assert_allclose(remote, np.asarray(local()), rtol=1e-6)
        np.testing.assert_allclose(remote, fns["numpy"](), atol=2e-5)
        assert "jax" in team.versions()
    finally:
        team.close()
    assert not team.jax._proc.is_alive()


def test_accuracy_far_from_zero():
    result = bench.accuracy.accuracy(["ln", "bn_train", "ln_bwd", "bn_bwd_train", "bn_eval",
                                      "rms", "rms_bwd", "add_ln"])
    assert set(result) == {"ln", "bn_train", "ln_bwd", "bn_bwd_train", "rms", "rms_bwd"}
    # (BN eval and the residual forms have no case)
    for op, errors in result.items():
        assert errors["cynorm"] is not None and errors["cynorm"] < 1e-5, (op, errors)
        if op.startswith("rms"):
            continue   # no mean subtracted: nothing cancels far from zero
        # the float32 NumPy expression loses digits far from zero: the table shows a trade
        assert errors["numpy"] is None or errors["numpy"] > 10 * errors["cynorm"], (op, errors)
    lines = bench.accuracy_table(result)
    assert lines[0].startswith("| op | cynorm | NumPy") and "10000 standard deviations" in lines[-1]


def test_the_table_has_a_column_per_peer_and_the_best_one():
    rows = [_result("ln", "with peers", {"cynorm": 1.0, "cynorm_out": 0.9, "numpy": 8.0,
                                         "torch": 4.0, "onnxruntime": 2.0, "jax": 3.0}),
            _result("ln_bwd", "no ONNX", {"cynorm": 1.0, "numpy": 8.0, "torch": 0.5,
                                          "jax": 3.0})]
    text = "\n".join(bench.table(rows))
    assert "| ONNX Runtime | JAX |" in text and "| vs best peer |" in text
    assert "| 2.00× (ONNX Runtime) |" in text and "| 0.50× (torch) |" in text
    summary = "\n".join(bench.summary(rows))
    assert "against ONNX Runtime: geometric mean 2.00× over 1 cases" in summary
    assert "against best peer: geometric mean 1.00× over 2 cases" in summary
