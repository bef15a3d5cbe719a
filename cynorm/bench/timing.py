"""Timing: calibrated samples, interleaved rounds, medians; the machine's facts for the report."""
import datetime
import os
import sys
import time

import numpy as np

from .accuracy import accuracy
from .contenders import contenders, copy_contenders
from .peers import PEERS, Peers


# Untimed calls before each sample of a case that fits the cache (timed's warm).  One was not
# enough on a machine whose L3 holds several contenders' working sets: a contender whose data
# the previous one had pushed out ran its next two or three calls slower (RESULTS item 89).
WARM_CALLS = 4


def _calibrate(fn, target=2e-3):
    """(calls per sample so that one sample lasts about ``target`` seconds, at least one;
    seconds one such sample takes)."""
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    k = max(1, min(10_000, int(target / dt)))
    return k, k * dt


class _Local:
    """A contender run in this process (a zero-argument callable), with the interface timed
    asks of every contender: calibrate(), and sample(k, warm) in seconds per call.  A peer in
    a worker process of its own (peers._Remote) answers the same two."""

    def __init__(self, fn):
        self.fn = fn

    def calibrate(self):
        self.fn()  # warm up: first-touch, caches, thread start-up
        return _calibrate(self.fn)

    def sample(self, k, warm):
        fn = self.fn
        for _ in range(warm):
            fn()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        return (time.perf_counter() - t0) / k


def timed(fns, rounds=15, max_seconds=None, warm=False, max_repeats=1):
    """Median seconds per call of each callable, measured in interleaved rounds.

    warm: WARM_CALLS untimed calls before each sample, so that a case that fits the cache is
    timed with its inputs in cache, whichever contender ran before it (without them, the
    first contender of each round met a cache just emptied by the last one, the roof copies).

    Round r starts at the r-th contender (the order rotates), so that no contender always
    follows the same one: what a contender leaves in the cache helps or hurts the next.

    max_repeats: a contender whose sample takes at most a quarter of the slowest one's gets
    up to this many samples per round, taken in sub-rounds that interleave as well.  On large
    inputs NumPy's call can take seconds, so the time budget allows only three rounds; without
    repeats the medians of the fast contenders (and of the roof copies) rested on three
    samples, and one disturbed stretch of the machine moved them."""
    runners = {name: fn if hasattr(fn, "sample") else _Local(fn) for name, fn in fns.items()}
    numbers, cost = {}, {}
    for name, runner in runners.items():
        numbers[name], cost[name] = runner.calibrate()
    slowest = max(cost.values())
    repeats = {name: max(1, min(max_repeats, int(slowest / (4 * c)))) for name, c in cost.items()}
    samples = {name: [] for name in fns}
    names = list(runners)
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for sub in range(max(repeats.values())):
            for name in order:
                if sub >= repeats[name]:
                    continue
                samples[name].append(runners[name].sample(numbers[name],
                                                          WARM_CALLS if warm else 0))
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return {name: float(np.median(s)) for name, s in samples.items()}


def machine_info(threads):
    import cynorm
    from cynorm._config import config_info

    info = config_info()
    info["threads"] = threads
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["cpu_count"] = os.cpu_count()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    info["cynorm_threads_default"] = cynorm.get_num_threads()
    return info


def run(case_list, threads=None, rounds=15, use_torch=True, progress=True, max_seconds=8.0,
        peers=PEERS):
    """Time every case; returns (machine info, list of result dicts).  peers: which of
    ONNX Runtime and JAX to hold cynorm against (those installed)."""
    import cynorm

    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    threads = threads or cynorm.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    results = []
    team = Peers(peers, threads) if peers else None
    try:
        with cynorm.num_threads(threads):
            _run_cases(case_list, torch, team, rounds, max_seconds, progress, results)
        info = machine_info(threads)
        info["peers"] = team.versions() if team is not None else {}
        if team is not None:
            info["accuracy"] = accuracy(sorted({c.op for c in case_list}), torch, team)
    finally:
        if team is not None:
            team.close()
    return info, results


def _run_cases(case_list, torch, team, rounds, max_seconds, progress, results):
    for i, case in enumerate(case_list, 1):
        if progress:
            bar = "#" * int(20 * i / len(case_list))
            print(f"\r[{bar:<20}] {i}/{len(case_list)} {case.label:<45}", end="",
                  file=sys.stderr, flush=True)
        fns = contenders(case, torch, peers=team)
        if case.size_class != "small":
            fns.update(copy_contenders(case.nbytes, torch))
        r = rounds if case.size_class != "large" else max(5, rounds // 3)
        large = case.size_class == "large"
        times = timed(fns, rounds=r, max_seconds=max_seconds, warm=not large,
                      max_repeats=5 if large else 1)
        copies = {k: times.pop(k) for k in list(times) if k.startswith("copy_")}
        row = {"case": case.id, "label": case.label, "op": case.op, "shape": list(case.shape),
               "dtype": case.dtype, "axis": case.axis, "size_class": case.size_class,
               "nbytes": case.nbytes, "times": times, "copy_times": copies}
        if copies:
            row["bandwidth"] = 2 * case.nbytes / min(copies.values())
            row["roof"] = case.bytes_moved / row["bandwidth"]
        results.append(row)
        del fns
    if progress:
        print(file=sys.stderr)
