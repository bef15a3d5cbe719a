import os
import subprocess
import sys

import cynorm


def test_show_config(capsys):
    cynorm.show_config()
    out = capsys.readouterr().out
    assert f"cynorm {cynorm.__version__}" in out
    for word in ("numpy", "OpenMP", "threads", "build flags"):
        assert word in out
    if os.environ.get("CYNORM_REQUIRE_OPENMP", "0") not in ("", "0"):
        assert "OpenMP       enabled" in out


def test_main_module_runs():
    r = subprocess.run([sys.executable, "-m", "cynorm"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OpenMP" in r.stdout and "LayerNorm(10)" in r.stdout


def test_public_names():
    for name in cynorm.__all__:
        assert hasattr(cynorm, name), name
