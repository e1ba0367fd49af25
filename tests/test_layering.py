"""Dependency direction: model/ imports torch and itself only; data_prep/ imports neither model/ nor
pipeline/; only pipeline/ imports deepspeed. Checked on the source (imports anywhere in a file) and by
importing the packages in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO

FORBIDDEN = {
    "model": {"deepspeed", "pipeline", "data_prep", "webdataset", "boto3"},
    "data_prep": {"deepspeed", "pipeline", "model", "torch"},
}


def imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_roots(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    for path in files:
        bad = imported_roots(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_importing_model_does_not_load_deepspeed():
    code = "import sys, model, model.parcae; print('deepspeed' in sys.modules, 'pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]
