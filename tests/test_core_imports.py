"""The library core never imports the EM experiment (:mod:`gradflow.em`): checked with
``ast`` over every source file outside ``gradflow/em``, for absolute and relative imports,
at module level or inside functions. The CLI (``cli/``) may import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradflow"
EXPERIMENT = PACKAGE / "em"
CORE = sorted(p for p in PACKAGE.rglob("*.py") if EXPERIMENT not in p.parents)


def imported_modules(source: str, path: Path) -> list[str]:
    """Every module the ``import`` and ``from ... import`` statements of ``source`` (the
    text of the file ``path`` in the package) name, relative ones resolved; ``from a
    import b`` names both ``a`` and ``a.b``."""
    package = list(path.relative_to(PACKAGE.parent).parent.parts)
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return found


def experiment_imports(modules: list[str]) -> list[str]:
    return [m for m in modules if m == "gradflow.em" or m.startswith("gradflow.em.")]


def test_the_core_is_every_library_file_outside_em() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in CORE}
    assert {"recorder/facade.py", "runfile/read.py", "writer.py", "probes/base.py"} <= names
    assert not any(name.startswith("em/") for name in names)


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_does_not_import_the_experiment(path: Path) -> None:
    assert experiment_imports(imported_modules(path.read_text(), path)) == []


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("from gradflow.em.train import train\n", "plots/x.py"),
        ("import gradflow.em.models\n", "x.py"),
        ("from gradflow import em\n", "x.py"),
        ("from ..em import config\n", "plots/x.py"),
        ("from . import em\n", "x.py"),
        ("from .em.models import FCN\n", "x.py"),
        ("def f():\n    from gradflow.em import data\n", "report/x.py"),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, where: str) -> None:
    assert experiment_imports(imported_modules(source, PACKAGE / where)), source


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("from gradflow.runfile import open_run\n", "plots/x.py"),
        ("from ..emit import x\n", "plots/x.py"),
        ("import gradflow.embedding\n", "x.py"),
        ("from . import errors\n", "x.py"),
    ],
)
def test_the_check_passes_other_imports(source: str, where: str) -> None:
    assert experiment_imports(imported_modules(source, PACKAGE / where)) == [], source
