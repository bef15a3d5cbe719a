"""cynorm.diagnostics and `cynorm demo`: BatchNorm against LayerNorm on padded batches."""
import subprocess
import sys

import numpy as np
import pytest

from cynorm import diagnostics


@pytest.fixture(scope="module")
def report():
    batches, long_sequence = diagnostics.synthetic_corpus(n_batches=12, batch_size=8,
                                                          long_length=1500, seed=3)
    return diagnostics.compare_normalizations(batches, long_sequence)


def test_corpus_is_padded_and_long_tailed():
    batches, long_sequence = diagnostics.synthetic_corpus(n_batches=5, batch_size=32, seed=1)
    lengths = np.concatenate([l for _, l in batches])
    assert lengths.min() >= 1 and lengths.max() > 3 * np.median(lengths)
    for x, l in batches:
        mask = np.arange(x.shape[1]) < l[:, None]
        assert (x[~mask] == 0).all() and x.shape[1] == l.max()
    assert long_sequence.shape[1] == batches[0][0].shape[2]


def test_masking_and_layer_norm_remove_the_padding_effects(report):
    assert 0.3 < report.padding_share < 0.95
    for field in ("mean_spread", "var_spread", "train_inference_gap", "output_gap"):
        values = getattr(report, field)
        assert values["bn_masked"] < values["bn_unmasked"], field
        assert values["ln"] == 0.0, field  # measured: a token's LN is the same in any batch
    assert abs(report.running_var_ratio["bn_masked"] - 1) < abs(
        report.running_var_ratio["bn_unmasked"] - 1)
    assert report.running_var_ratio["ln"] is None
    table = report.table()
    for row in ("BN unmasked", "BN masked", "LN"):
        assert f"| {row} |" in table
    assert set(report.as_dict()) >= {"mean_spread", "padding_share"}


def test_plot(report, tmp_path):
    path = report.plot(str(tmp_path / "demo.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None
    else:
        assert path and (tmp_path / "demo.png").stat().st_size > 1000


def test_demo_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cynorm", "demo", "--batches", "6", "--plot",
                        str(tmp_path / "d.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "BN masked" in r.stdout and "LN" in r.stdout
