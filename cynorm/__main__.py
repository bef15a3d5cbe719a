"""`python -m cynorm` / `cynorm`: the build and a demo batch; `cynorm bench`: the speed report;
`cynorm demo`: BatchNorm against LayerNorm on padded variable-length batches."""
import argparse
import sys

import numpy as np


def _demo():
    import cynorm

    cynorm.show_config()
    rng = np.random.default_rng(0)
    x = (1e4 + 3.0 * rng.standard_normal((5, 10))).astype(np.float32)
    print("\nA (5, 10) float32 batch with mean 1e4 and std 3:")
    ln = cynorm.LayerNorm(10)
    y = ln(x)
    print("LayerNorm(10): per-row mean", np.round(y.mean(axis=1), 6),
          "std", np.round(y.std(axis=1), 4))
    bn = cynorm.BatchNorm1d(10)
    z = bn(x)
    print("BatchNorm1d(10), training: per-feature mean", np.round(z.mean(axis=0), 6))
    print("  running_mean after one step", np.round(bn.running_mean, 2))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "demo":
        from .diagnostics import main as demo_main

        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(prog="cynorm", description="cynorm: fast, accurate, "
                                     "torch-compatible normalization layers for NumPy arrays.")
    commands = parser.add_subparsers(dest="command", metavar="command",
                                     title="commands (info when none is given)")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, description=text)
    parser.parse_args(argv)
    return _demo()


COMMANDS = {
    "info": "print the build configuration (show_config()) and normalize a demo batch",
    "bench": "time every op against NumPy and torch and write a report folder "
             "(cynorm bench --help for the options)",
    "demo": "BatchNorm against LayerNorm on padded variable-length batches (statistics "
            "spread, running-statistics gap, a plot)",
}


if __name__ == "__main__":
    sys.exit(main())
