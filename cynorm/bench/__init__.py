"""Speed of cynorm against the NumPy expression a user would write and against torch on CPU.

One place for the cases and the contenders, used by ``cynorm bench`` (``python -m cynorm
bench``) and by the pytest-benchmark suite in ``benchmarks/``.  Timings are medians of
interleaved rounds (cynorm, NumPy, torch, cynorm, ...), so that drift of the machine hits every
contender alike.  Inputs are reused between calls: cases that fit the L3 cache are cache figures
(each of their samples follows untimed calls of the same contender; the rounds rotate
which contender goes first).

Each medium and large case is also set against a memory roof timed in the same interleaved
rounds: a same-size copy into a preallocated array (NumPy, and torch with all threads when
present; the faster counts) gives bytes per second; the case's bytes moved (LN: one read and one
write; BN training: two reads and one write once x outgrows the cache; BN eval: one read and one
write) divided by it is the roof time.  For BN training on inputs only a little larger than the
cache, part of the second read still comes from cache, so cynorm can beat that model.
"""
from . import accuracy
from .contenders import contenders, copy_contenders
from .grid import (
    CONTENDER_NAMES,
    CONTENDERS,
    FUSED_OPS,
    FUSED_TARGET,
    HALF_DTYPES,
    HALF_OPS,
    L3_BYTES,
    MASK_REFERENCES,
    MASK_SHAPES,
    MASK_TARGETS,
    OPS,
    QUICK,
    ROW_OPS,
    SKLEARN_OPS,
    Case,
    cases,
    half_dtypes,
    np_dtype,
)
from . import peers
from .peers import PEERS, Peers
from .report import (_plots, accuracy_table, fused_table, mask_table, sklearn_table, summary,
                     table, write_report)
from .timing import machine_info, run, timed

__all__ = ["Case", "cases", "contenders", "copy_contenders", "run", "timed", "machine_info",
           "table", "summary", "mask_table", "sklearn_table", "write_report", "main", "OPS",
           "QUICK", "CONTENDERS", "CONTENDER_NAMES", "L3_BYTES", "MASK_REFERENCES",
           "MASK_SHAPES", "MASK_TARGETS", "SKLEARN_OPS", "_plots", "peers", "Peers", "PEERS",
           "accuracy", "accuracy_table", "fused_table", "FUSED_OPS", "FUSED_TARGET", "ROW_OPS",
           "HALF_OPS", "HALF_DTYPES", "half_dtypes", "np_dtype"]


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="cynorm bench", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true",
                   help="every shape in float32 and float64 (default: the quick grid, float32;"
                        " both also time the row norms in float16 and bfloat16)")
    p.add_argument("--ops", default=None,
                   help="comma list of " + ", ".join(OPS) + " (default: all of them)")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, float64, float16, bfloat16 (default: float32, "
                        "and the row norms in float16 and bfloat16; with --full float64 too)")
    p.add_argument("--sizes", default=None,
                   help="comma list of small, medium, large (default: all three)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for cynorm and torch (default: cynorm's own count, from "
                        "OMP_NUM_THREADS or the CPUs the process may use)")
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds per case (default: %(default)s)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out (default: timed "
                   "when installed)")
    p.add_argument("--contenders", default=None,
                   help="comma list of the peers to hold cynorm against: torch, onnxruntime, "
                        "jax (default: every one installed; NumPy is always timed)")
    p.add_argument("--out", default="cynorm-bench-report",
                   help="report folder (default: %(default)s)")
    args = p.parse_args(argv)

    def split(v):
        return [s.strip() for s in v.split(",")] if v else None

    grid = cases(args.full, split(args.ops), split(args.dtype), split(args.sizes))
    if not grid:
        p.error("no case matches the options")
    chosen = split(args.contenders)
    known = ("torch",) + PEERS
    if chosen and set(chosen) - set(known):
        p.error(f"--contenders: unknown {sorted(set(chosen) - set(known))}; expected some of "
                f"{', '.join(known)}")
    use_torch = not args.no_torch and (chosen is None or "torch" in chosen)
    peers = [q for q in PEERS if chosen is None or q in chosen]
    info, results = run(grid, args.threads, args.rounds, use_torch, peers=peers)
    versions = ", ".join(f"{k} {v}" for k, v in info["peers"].items()) or "no other peer"
    print(f"cynorm {info['cynorm']} ({info['isa']} kernels, OpenMP "
          f"{'on' if info['openmp'] else 'off'}), {info['threads']} threads, torch "
          f"{info['torch'] or 'not installed'}, {versions}, NumPy {info['numpy']}, "
          f"CPU {info['cpu']}\n")
    print("\n".join(table(results)))
    print("\n" + "\n".join(summary(results)))
    errors = accuracy_table(info.get("accuracy"))
    if errors:
        print("\nAccuracy far from zero:\n" + "\n".join(errors))
    fused = fused_table(results)
    if fused:
        print("\nResidual add, fused:\n" + "\n".join(fused))
    masks = mask_table(results)
    if masks:
        print("\nPadding masks:\n" + "\n".join(masks))
    scalers = sklearn_table(results)
    if scalers:
        print("\nscikit-learn:\n" + "\n".join(scalers))
    path = write_report(info, results, args.out)
    print(f"\nreport: {path}")
    return 0
