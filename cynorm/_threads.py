"""The single source of cynorm's thread count.

``get_num_threads()`` is what every kernel call uses.  In order of precedence:

1. in a process forked after cynorm was imported: 1, whatever else was asked.  GNU libgomp's
   thread team does not survive ``fork()``; a child that enters a parallel region with more
   than one thread waits for it forever.  (Workers that want threads: start them with the
   'spawn' or 'forkserver' method of multiprocessing.)
2. ``set_num_threads(n)`` / ``with cynorm.num_threads(n):``, set by the user;
3. otherwise ``omp_get_max_threads()``, which honours ``OMP_NUM_THREADS`` and threadpoolctl's
   limits, capped by the CPUs this process may use (affinity mask and cgroup CPU quota).
"""
import contextlib
import math
import os
import threading

from ._runtime import POLICY, omp_max_threads as _omp_max_threads

# Below this many elements a call runs on the calling thread (pyx/policy.h).
SERIAL_BELOW = POLICY["serial_below"]

_state = threading.local()
_global = {"user": None, "forked_child": False}


def _cpu_limit():
    """CPUs this process may use: affinity mask, then a cgroup v2 / v1 CPU quota if one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(period)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if q > 0 and period > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


_CPU_LIMIT = _cpu_limit()


def get_num_threads():
    """Number of threads cynorm's kernels use for a large input."""
    if _global["forked_child"]:
        return 1
    n = getattr(_state, "user", None)
    if n is None:
        n = _global["user"]
    if n is not None:
        return n
    return max(1, min(_omp_max_threads(), _CPU_LIMIT))


def threads_for(size, serial_below=SERIAL_BELOW):
    """Threads for an input of ``size`` elements: 1 below ``serial_below``."""
    if size < serial_below:
        return 1
    return get_num_threads()


def _check_n(n):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive int or None, got {n!r}")
    return n


def set_num_threads(n):
    """Use ``n`` threads in every later call (None: back to the default)."""
    _global["user"] = _check_n(n)


@contextlib.contextmanager
def num_threads(n):
    """Context manager: use ``n`` threads in this Python thread inside the block."""
    n = _check_n(n)
    previous = getattr(_state, "user", None)
    _state.user = n
    try:
        yield n
    finally:
        _state.user = previous


def _after_fork_in_child():
    _global["user"] = None
    _global["forked_child"] = True
    _state.__dict__.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
