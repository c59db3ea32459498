"""The test suite's own structure: no module under tests/ imports a test module (shared code is
in helper modules and conftest.py fixtures, so each test module is collected once and a session
fixture is one fixture), and the markers that split the layers are registered."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in `path`, at any depth (functions too),
    relative imports resolved against the file's package (its folders below `root`)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from tests import test_x`
    return found


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and parts[-1].startswith("test_")


def test_no_module_under_tests_imports_a_test_module():
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}"
                 for path in sorted(TESTS.rglob("*.py"))
                 for line, name in _imported_modules(path) if _is_test_module(name)]
    assert not offenders, ("test modules import test modules (move the shared code to a helper module or a "
                           "conftest.py fixture):\n" + "\n".join(offenders))


def test_the_check_sees_every_form_of_import(tmp_path):
    """The checker itself: plain, from, relative and in-function imports of a test module."""
    path = tmp_path / "tests" / "runtime" / "helper.py"
    path.parent.mkdir(parents=True)
    path.write_text("import tests.test_serve\nfrom tests.runtime.test_core import add\nfrom .test_daemon import Line\n"
                    "from . import test_ingest\ndef f():\n    from tests.runtime import fakes\n")
    names = [name for _, name in _imported_modules(path, root=tmp_path)]
    assert [n for n in names if _is_test_module(n)] == [
        "tests.test_serve", "tests.runtime.test_core", "tests.runtime.test_daemon", "tests.runtime.test_ingest"]
    assert "tests.runtime.fakes" in names


def test_the_layer_markers_are_registered_and_strict(pytestconfig):
    names = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"system", "slow", "cuda"} <= names
    addopts = pytestconfig.getini("addopts")
    assert "--strict-markers" in addopts and "--durations=25" in addopts
