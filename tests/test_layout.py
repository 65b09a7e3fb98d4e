"""Library apart from application: no module of irra_dist outside irra_dist/engine/ imports the engine,
argparse, tqdm or wandb, at the top or inside a function (docs/ARCHITECTURE.md, "Packages")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "irra_dist"
APPLICATION = PACKAGE / "engine"
FORBIDDEN = ("irra_dist.engine", "argparse", "tqdm", "wandb")
IMPORT_FUNCTIONS = ("import_module", "__import__")

# Nothing is exempt. A file added here must say why, and the test below checks that it still exists.
EXEMPT: set[str] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, wherever it is, plus import_module("...")."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from irra_dist import engine` imports the submodule irra_dist.engine.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORT_FUNCTIONS):
            found.append((node.lineno, node.args[0].value))
    return found


def _forbidden(name: str) -> str | None:
    return next((f for f in FORBIDDEN if name == f or name.startswith(f + ".")), None)


def violations(source: str, path: str, module: str, is_package: bool = False) -> list[str]:
    """One line per forbidden import in `source`, naming the file, the line and what it imports."""
    lines = []
    for lineno, name in _imported(ast.parse(source, filename=path), module, is_package):
        what = _forbidden(name)
        if what:
            lines.append(f"{path}:{lineno} imports {name} ({what} belongs to the application: "
                         "move this code into irra_dist/engine/)")
    return lines


def _library_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if path.is_relative_to(APPLICATION) or rel in EXEMPT or f"{rel.rpartition('/')[0]}/*" in EXEMPT:
            continue
        files.append(path)
    return files


def test_library_modules_import_no_application_piece() -> None:
    files = _library_files()
    assert len(files) > 30  # the scan found the package
    found = [line for path in files
             for line in violations(path.read_text(), path.relative_to(REPO).as_posix(), _module_name(path),
                                    path.name == "__init__.py")]
    assert not found, "the library imports application pieces:\n" + "\n".join(found)


def test_exemptions_name_existing_files() -> None:
    for entry in EXEMPT:
        matches = list(REPO.glob(entry))
        assert matches, f"{entry} is exempt but does not exist any more: remove it from EXEMPT"


@pytest.mark.parametrize(("source", "expected"), [
    ("import argparse", ["argparse"]),
    ("def main():\n    import tqdm.auto\n", ["tqdm.auto"]),
    ("if True:\n    from wandb import Image\n", ["wandb.Image"]),
    ("from irra_dist.engine.trainer import train", ["irra_dist.engine.trainer.train"]),
    ("from irra_dist import engine", ["irra_dist.engine"]),
    ("from ..engine import runfolder", ["irra_dist.engine.runfolder"]),
    ("from .. import engine", ["irra_dist.engine"]),
    ("import importlib\nimportlib.import_module('irra_dist.engine.cli')", ["irra_dist.engine.cli"]),
    ("import argparse_helpers\nfrom irra_dist.engineering import x\nfrom . import tqdm_free", []),
    ("from irra_dist.data import shards\nimport torch", []),
])
def test_the_scan_finds_forbidden_imports_anywhere(source: str, expected: list[str]) -> None:
    found = violations(source, "irra_dist/data/example.py", "irra_dist.data.example")
    assert [line.split(" imports ")[1].split(" ")[0] for line in found] == expected
    assert all(line.startswith("irra_dist/data/example.py:") for line in found)
