"""Why LayerNorm wins on variable-length sequences, measured.

In a padded batch of sequences (N, T, C), BatchNorm's per-feature statistics mix real tokens
with padding unless they are masked, and jump from batch to batch with the share of padding;
running statistics learnt that way do not fit a long sequence at inference.  LayerNorm's
statistics are per token: no running averages, nothing that depends on the batch.

``compare_normalizations`` measures all of that on a stream of padded batches;
``synthetic_corpus`` makes such a stream (long-tailed lengths, nothing downloaded);
``python -m cynorm demo`` runs both and prints the table.
"""
import dataclasses

import numpy as np

from .functional import batch_norm, layer_norm
from .layers import BatchNorm

__all__ = ["PaddingReport", "compare_normalizations", "synthetic_corpus"]

EPS = 1e-5


@dataclasses.dataclass
class PaddingReport:
    """What compare_normalizations measured.  Spreads and gaps are in units of each feature's
    true standard deviation (from the long sequence), averaged over features; ``var_*`` are
    ratios to the true variance.  Keys of the dicts: "bn_unmasked", "bn_masked", "ln"."""

    n_batches: int
    n_tokens: int
    padding_share: float
    mean_spread: dict  # batch-to-batch std of the statistics' mean
    var_spread: dict  # batch-to-batch std of the statistics' variance / true variance
    train_inference_gap: dict  # |running mean - long-sequence mean| (LN: its own statistics)
    running_var_ratio: dict  # running variance / long-sequence variance (LN: None, none kept)
    output_gap: dict  # mean |output at inference - output with the true statistics|
    batch_means: dict = dataclasses.field(repr=False)  # per batch, of feature `feature`
    true_mean: float = dataclasses.field(repr=False, default=0.0)
    feature: int = dataclasses.field(repr=False, default=0)  # the one farthest from zero

    def table(self):
        rows = [("BN unmasked", "bn_unmasked"), ("BN masked", "bn_masked"), ("LN", "ln")]
        head = ("| | batch-to-batch spread of the mean | spread of the variance | "
                "train / inference gap of the mean | running var / true var | "
                "output error at inference |")
        lines = [head, "|---|---|---|---|---|---|"]
        for label, key in rows:
            ratio = self.running_var_ratio[key]
            ratio = "none kept" if ratio is None else f"{ratio:.3f}"
            lines.append(f"| {label} | {self.mean_spread[key]:.4f} | {self.var_spread[key]:.4f} | "
                         f"{self.train_inference_gap[key]:.4f} | {ratio} | "
                         f"{self.output_gap[key]:.4f} |")
        return "\n".join(lines)

    def as_dict(self):
        return dataclasses.asdict(self)

    def plot(self, path):
        """Per-batch mean of one feature (BN unmasked and masked) against the truth; None
        without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(8, 4))
        for key, label in (("bn_unmasked", "BN statistics, padding included"),
                           ("bn_masked", "BN statistics, padding masked")):
            ax.plot(self.batch_means[key], marker="o", ms=3, label=label)
        ax.axhline(self.true_mean, color="k", ls="--", label="true mean (long sequence)")
        ax.set_xlabel("batch")
        ax.set_ylabel(f"mean of feature {self.feature}")
        ax.set_title(f"Padded batches ({self.padding_share:.0%} padding): BatchNorm's batch mean")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def synthetic_corpus(n_batches=40, batch_size=16, n_features=16, long_length=4000, seed=0,
                     median_length=12, max_length=256):
    """(batches, long_sequence): padded batches ``(x (N, T, C), lengths (N,))`` of sentences
    with log-normal (long-tailed) lengths, zero padding, and one long sequence of the same
    token distribution, (long_length, C).  Each feature has its own mean and scale."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.0, 2.0, n_features)
    sigma = rng.uniform(0.5, 2.0, n_features)

    def tokens(n):
        return mu + sigma * rng.standard_normal((n, n_features))

    batches = []
    for _ in range(n_batches):
        lengths = np.clip(np.round(rng.lognormal(np.log(median_length), 0.9, batch_size)), 1,
                          max_length).astype(np.int64)
        T = int(lengths.max())
        x = np.zeros((batch_size, T, n_features))
        for n, length in enumerate(lengths):
            x[n, :length] = tokens(length)
        batches.append((x, lengths))
    return batches, tokens(long_length)


def _stats(y_mean, invstd):
    return y_mean, 1.0 / invstd ** 2 - EPS


def compare_normalizations(batches, long_sequence, momentum=0.1):
    """Measure BN (unmasked, masked) and LN on a stream of padded batches; see PaddingReport.

    batches: iterable of (x (N, T, C), lengths (N,)); long_sequence: (L, C) real tokens.
    """
    batches = list(batches)
    long_sequence = np.asarray(long_sequence, dtype=np.float64)
    C = long_sequence.shape[1]
    _, true_mean, true_invstd = batch_norm(long_sequence, training=True, return_stats=True)
    true_mean, true_var = _stats(true_mean, true_invstd)
    true_std = np.sqrt(true_var)
    layers = {"bn_unmasked": BatchNorm(C, momentum=momentum, axis=-1, dtype=np.float64),
              "bn_masked": BatchNorm(C, momentum=momentum, axis=-1, dtype=np.float64)}
    means = {k: [] for k in layers}
    variances = {k: [] for k in layers}
    ln_gap = 0.0
    n_tokens = n_real = 0
    for x, lengths in batches:
        x = np.asarray(x, dtype=np.float64)
        lengths = np.asarray(lengths)
        n_tokens += x.shape[0] * x.shape[1]
        n_real += int(lengths.sum())
        for key, kwargs in (("bn_unmasked", {}), ("bn_masked", {"lengths": lengths})):
            _, m, inv = batch_norm(x, training=True, axis=-1, return_stats=True, **kwargs)
            m, v = _stats(m, inv)
            means[key].append(m)
            variances[key].append(v)
            layers[key](x, **kwargs)  # the running statistics a trained model would keep
        # LayerNorm of a token inside its padded batch against the token alone
        mask = np.arange(x.shape[1]) < lengths[:, None]
        _, ln_mean, _ = layer_norm(x, C, lengths=lengths, return_stats=True)
        _, alone, _ = layer_norm(x[mask], C, return_stats=True)
        ln_gap = max(ln_gap, float(np.max(np.abs(ln_mean[mask] - alone), initial=0.0)))

    report = {"mean_spread": {}, "var_spread": {}, "train_inference_gap": {},
              "running_var_ratio": {}, "output_gap": {}}
    truth = batch_norm(long_sequence, true_mean, true_var, training=False, eps=EPS)
    for key, layer in layers.items():
        m = np.array(means[key])
        v = np.array(variances[key])
        report["mean_spread"][key] = float(np.mean(m.std(axis=0) / true_std))
        report["var_spread"][key] = float(np.mean(v.std(axis=0) / true_var))
        report["train_inference_gap"][key] = float(
            np.mean(np.abs(layer.running_mean - true_mean) / true_std))
        report["running_var_ratio"][key] = float(np.mean(layer.running_var / true_var))
        layer.eval()
        report["output_gap"][key] = float(np.mean(np.abs(layer(long_sequence) - truth)))
    # LayerNorm keeps no running statistics: a token's statistics are the same in any batch
    # and at inference.  Its "spread" is that of one token's statistics across the batches it
    # could sit in: measured above as the largest difference from the token alone.
    report["mean_spread"]["ln"] = ln_gap
    report["var_spread"]["ln"] = ln_gap
    report["train_inference_gap"]["ln"] = ln_gap
    report["running_var_ratio"]["ln"] = None  # LN keeps no running statistics
    report["output_gap"]["ln"] = ln_gap
    f = int(np.argmax(np.abs(true_mean) / true_std))  # where padding zeros pull hardest
    return PaddingReport(
        n_batches=len(batches), n_tokens=n_tokens,
        padding_share=1.0 - n_real / max(n_tokens, 1), batch_means={
            k: [float(v[f]) for v in means[k]] for k in means}, true_mean=float(true_mean[f]),
        feature=f, **report)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="cynorm demo", description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="cynorm-demo.png", help="PNG path ('' for none)")
    args = p.parse_args(argv)
    batches, long_sequence = synthetic_corpus(args.batches, args.batch_size, seed=args.seed)
    report = compare_normalizations(batches, long_sequence)
    print(f"{report.n_batches} padded batches of {args.batch_size} synthetic sentences "
          f"(log-normal lengths, {report.padding_share:.0%} padding), 16 features; "
          f"inference on one sequence of {len(long_sequence)} tokens.\n"
          "Spreads and gaps in units of each feature's standard deviation, averaged over "
          "features.\n")
    print(report.table())
    print("\nBN unmasked: padding zeros drag the batch mean and variance, by a different amount "
          "in every batch, and the running statistics learnt that way do not fit the long "
          "sequence. BN masked: only sampling noise. LN: a token's statistics do not depend on "
          "its batch at all, so there is nothing to learn and nothing to drift.")
    if args.plot:
        path = report.plot(args.plot)
        print(f"\nplot: {path}" if path else "\n(matplotlib is not installed: no plot)")
    return 0
