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
        _isa.kernels.layer_norm(xd, y_sel, None, None, None, None, 1e-5, 1)
        module.layer_norm(xd, y_var, None, None, None, None, 1e-5, 1)
        np.testing.assert_allclose(y_var, y_sel, atol=1e-5 if dtype == np.float32 else 1e-12)
        T = 2
        parts = [np.empty((3, T, 1000)) for _ in range(2)]
        counts = [np.empty(T), np.empty(T)]
        for mod, p, c in ((_isa.kernels, parts[0], counts[0]), (module, parts[1], counts[1])):
            mod.column_moments_into(xd, c, p[0], p[1], p[2], np.empty((T, 3, 1000)), 8)
        np.testing.assert_array_equal(counts[0], counts[1])
        np.testing.assert_allclose(parts[0][0] + parts[0][1], parts[1][0] + parts[1][1],
                                   rtol=1e-15)
        np.testing.assert_allclose(parts[0][2], parts[1][2], rtol=1e-10)


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
