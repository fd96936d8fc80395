"""Tests as tests: no test module imports ``conftest`` or another ``test_*`` module as a library.

Shared builders live in the ``helpers`` package (tests/helpers/); conftest.py holds fixtures and
hooks only. Checked here by reading every module of tests/, tests/golden/ and tests/helpers/ with
``ast``: an import anywhere in a file (a function's body included) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import helpers

TESTS = Path(__file__).resolve().parent
FOLDERS = (TESTS, TESTS / "golden", TESTS / "helpers")
LOCAL_PACKAGES = {"tests", "golden", "helpers"}     # from PACKAGE import test_x, conftest


def _forbidden(name: str) -> bool:
    return name == "conftest" or name.startswith("test_")


def library_imports(source: str) -> list[tuple[int, str]]:
    """(line, statement) of each import of ``conftest`` or of a ``test_*`` module in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            bad = any(_forbidden(part) for name in names for part in name.split("."))
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            bad = any(_forbidden(part) for part in parts)
            if node.level or (parts and parts[0] in LOCAL_PACKAGES):
                bad = bad or any(_forbidden(alias.name) for alias in node.names)
        else:
            continue
        if bad:
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_imports_conftest_or_a_test_module():
    offenders = []
    for folder in FOLDERS:
        for path in sorted(folder.glob("*.py")):
            for line, statement in library_imports(path.read_text()):
                offenders.append(f"{path.relative_to(TESTS.parent)}:{line}: {statement}")
    assert offenders == [], (
        "test modules import conftest or other test modules; move what they share into "
        "tests/helpers/:\n" + "\n".join(offenders))


def test_the_check_sees_every_form_of_such_an_import():
    source = "\n".join([
        "import os",
        "from helpers.cli import run_cli",
        "from conftest import make_model",
        "import test_signals",
        "import test_signals as signals",
        "from test_merge_peft import build_base",
        "from tests.test_merge_errors import SPEC",
        "from golden import test_x",
        "from . import conftest",
        "def f():",
        "    from conftest import perturb_trainables",
        "from adaptertools.testing import test_data",     # another package's name: allowed
    ])
    assert [line for line, _ in library_imports(source)] == [3, 4, 5, 6, 7, 8, 9, 11]


def test_helpers_is_the_tests_own_package():
    """``helpers`` comes from tests/helpers/, not from an installed package of that name."""
    assert Path(helpers.__file__).resolve() == TESTS / "helpers" / "__init__.py"
