"""The README's Python examples run as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_python_blocks_run():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    namespace = {}
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    finally:
        import cynorm

        cynorm.set_num_threads(None)  # the README sets it; leave the process as it was


def test_guarantees_name_tests_that_exist():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    text = README.read_text()
    section = text[text.index("## Guarantees"):text.index("## Build options")]
    tests_dir = pathlib.Path(__file__).resolve().parent
    defined = {}
    for path in tests_dir.glob("test_*.py"):
        for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M):
            defined.setdefault(name, set()).add(path.name)
    named = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)`", section)
    assert len(named) >= 20
    for file, name in named:
        assert name in defined, name
        if file:
            assert file in defined[name], (file, name)
    for file in re.findall(r"`tests/(test_\w+\.py)`", section):
        assert (tests_dir / file).exists(), file
