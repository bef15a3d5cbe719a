"""Every kernels build this CPU runs (baseline, AVX2, AVX-512) gives the same results."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cynorm
from cynorm import _isa
from conftest import hostile


def test_selected_is_the_widest_available():
    names = _isa.available()
    assert "baseline" in names
    if not os.environ.get("CYNORM_ISA"):
        assert _isa.kernels.ISA == names[0]


@pytest.mark.parametrize("name", ["baseline", "avx2", "avx512"])
def test_variant_agrees_with_selected(rng, name):
    module = _isa.load(name)
    if module is None:
        pytest.skip(f"{name} kernels not built or not runnable on this CPU")
    x = hostile(rng, (37, 1000), np.float32, offset=1e4)
    for dtype in (np.float32, np.float64):
        xd = x.astype(dtype)
        y_sel, y_var = np.empty_like(xd), np.empty_like(xd)
        _isa.kernels.layer_norm(xd, y_sel, 1000, None, None, None, None, 1e-5, 1)
        module.layer_norm(xd, y_var, 1000, None, None, None, None, 1e-5, 1)
        np.testing.assert_allclose(y_var, y_sel, atol=1e-5 if dtype == np.float32 else 1e-12)
        for by_rows in (True, False):
            stats = [np.empty((3, 37 if by_rows else 1000)) for _ in range(2)]
            counts = [mod.feature_moments(xd, 37, 1000, st.shape[1], by_rows, st, 2)
                      for mod, st in ((_isa.kernels, stats[0]), (module, stats[1]))]
            assert counts[0] == counts[1] == (1000 if by_rows else 37)
            np.testing.assert_allclose(stats[0][0] + stats[0][1], stats[1][0] + stats[1][1],
                                       rtol=1e-15)
            np.testing.assert_allclose(stats[0][2], stats[1][2], rtol=1e-10)


@pytest.mark.parametrize("name", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("shape", [(37, 1000), (9, 203), (64, 128)])
def test_variant_backward_agrees_with_selected(rng, name, shape):
    # the backward kernels differ by build (the baseline build's four-column LN sweep, AVX2's
    # split vectors): every runnable build against the selected one, both dtypes, with and
    # without weight; rows not a multiple of four and a row length that leaves a vector tail
    module = _isa.load(name)
    if module is None:
        pytest.skip(f"{name} kernels not built or not runnable on this CPU")
    M, D = shape
    for dtype in (np.float32, np.float64):
        x = hostile(rng, shape, dtype, offset=1e4)
        g = rng.standard_normal(shape).astype(dtype)
        w = rng.uniform(0.5, 2, D).astype(dtype)
        _, mean, rstd = cynorm.layer_norm(x, D, w, None, return_stats=True)
        tol = 1e-5 if dtype == np.float32 else 1e-12  # norm-wise: builds round differently
        for weight in (w, None):
            outs = []
            for mod in (_isa.kernels, module):
                dx, dw, db = np.empty_like(x), np.empty(D, dtype), np.empty(D, dtype)
                mod.layer_norm_backward(g, x, dx, D, weight, mean, rstd, dw, db, 2)
                outs.append((dx, dw, db))
            for a, b in zip(*outs):
                assert np.linalg.norm(b - a) <= tol * np.linalg.norm(a)
        for training in (True, False):
            _, bmean, binv = cynorm.batch_norm(x, np.zeros(D, dtype), np.ones(D, dtype), w, None,
                                               training, return_stats=True)
            outs = []
            for mod in (_isa.kernels, module):
                dx, dw, db = np.empty_like(x), np.empty(D, dtype), np.empty(D, dtype)
                mod.batch_norm_backward(g, x, dx, M, D, D, False, bmean, binv, w, training,
                                        dw, db, 2)
                outs.append((dx, dw, db))
            for a, b in zip(*outs):
                assert np.linalg.norm(b - a) <= tol * np.linalg.norm(a)


def test_forcing_an_isa_by_environment():
    code = "import cynorm, cynorm._isa as i; print(i.kernels.ISA)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CYNORM_ISA": "baseline"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "baseline"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "CYNORM_ISA": "sse9"}, timeout=60)
    assert r.returncode != 0 and "CYNORM_ISA" in r.stderr


def test_show_config_names_the_kernels(capsys):
    cynorm.show_config()
    assert f"kernels      {_isa.kernels.ISA}" in capsys.readouterr().out
