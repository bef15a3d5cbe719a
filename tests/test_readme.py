"""The README's Python examples run as written."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    if not README.exists():
        return []
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    assert len(_python_blocks()) >= 6


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_each_python_block_runs_alone(index, tmp_path):
    """Each block in a fresh interpreter, with nothing from the blocks before it."""
    block = _python_blocks()[index]
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"README block {index + 1}:\n{block}\n{r.stderr}"


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


def test_ci_runs_the_readme_test_command():
    if not README.exists():
        pytest.skip("README.md is not next to the tests (installed package)")
    text = README.read_text()
    after = text[text.index("To run the tests:"):]
    command = re.search(r"```bash\n(.*?)\n```", after, flags=re.S).group(1).strip()
    assert "torch==2.13.0" in command  # the whole suite, with the CPU build pinned
    ci = (README.parent / ".ci" / "run").read_text()
    assert f"{command} ||" in ci, command


def test_architecture_names_files_that_exist():
    """ARCHITECTURE.md is the map of the tree: every path it names is there."""
    top = README.parent
    arch = top / "ARCHITECTURE.md"
    if not arch.exists():
        pytest.skip("ARCHITECTURE.md is not next to the tests (installed package)")
    text = arch.read_text()
    named = set(re.findall(r"`((?:pyx|cynorm|tests|benchmarks)/[\w./]+?)`", text))
    tree = text[text.index("```"):text.index("```", text.index("```") + 3)]
    folder = None
    for line in tree.splitlines()[1:]:
        entry = line.split()[0].rstrip(",") if line.strip() else ""
        if line.startswith("  ") and not line.startswith("    ") and entry.endswith("/"):
            folder = entry
        elif line.startswith("    ") and folder and not line.startswith("                "):
            if "." in entry or entry.endswith("/"):
                named.add(f"{parent}{folder}{entry}")
        elif not line.startswith(" ") and entry.endswith("/"):
            parent, folder = entry, None
            named.add(entry)
        elif line.startswith("  ") and not line.startswith("   ") and "." in entry:
            named.add(f"{parent}{entry}")
    assert len(named) > 30
    new_op = {"pyx/ops/rms_norm.pxi", "pyx/ops/rms_norm.h", "cynorm/_rms_norm.py",
              "tests/test_rms_norm.py"}  # the checklist's example files, to be written
    missing = sorted(p for p in named - new_op if not (top / p).exists())
    assert not missing, missing
