"""Package structure: the import-linter contracts of pyproject.toml hold (train -> reinforce -> stores, and the
layers inside each package), no module takes another's private names, and no module imports at its bottom
(a plug-in registers by being imported from its package's ``__init__``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

PACKAGES = ("stores", "reinforce", "train")
MODULES = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([str(lint_imports)], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_names_across_modules(path):
    private = [f"{node.module}.{alias.name} (line {node.lineno})" for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES
               for alias in node.names if alias.name.startswith("_")]
    assert not private, f"{path.relative_to(REPO)} imports private names: {private}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_only_at_the_top(path):
    body = ast.parse(path.read_text()).body
    code = [i for i, node in enumerate(body) if not isinstance(node, (ast.Import, ast.ImportFrom, ast.If))
            and not (i == 0 and isinstance(node, ast.Expr))]  # the docstring; `if TYPE_CHECKING:` imports
    late = [node.lineno for node in body[code[0]:] if isinstance(node, (ast.Import, ast.ImportFrom))] if code else []
    assert not late, f"{path.relative_to(REPO)} imports below its code, at line(s) {late}"
