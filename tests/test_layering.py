"""The package's dependency rules, checked on the source (docs/architecture.md).

Dependencies point one way: a package imports only packages of lower layers, and no module
imports or reads another module's private names.  Every import counts, lazy and
``TYPE_CHECKING`` ones too: a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Iterator
from pathlib import Path

import blobmesh

ROOT = Path(blobmesh.__file__).parent

#: Bottom first; a package imports only packages of layers below its own.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "types", "logutil", "tasks"}),
    frozenset({"hashing", "wire"}),
    frozenset({"store", "transport"}),
    frozenset({"collection", "shares", "transfer", "space"}),
    frozenset({"distribution"}),
    frozenset({"node", "sim"}),
    frozenset({"dashboard"}),
    frozenset({"cli"}),
    frozenset({"demo", "__init__"}),
)
LAYER = {pkg: n for n, layer in enumerate(LAYERS) for pkg in layer}

Source = tuple[str, ast.Module]  # (path below blobmesh/, e.g. "store/gc.py"; its tree)


@functools.cache
def sources() -> tuple[Source, ...]:
    return tuple((p.relative_to(ROOT).as_posix(), ast.parse(p.read_text(), str(p)))
                 for p in sorted(ROOT.rglob("*.py")))


def package_of(rel: str) -> str:
    return rel.split("/")[0].removesuffix(".py")


def module_of(rel: str) -> str:
    parts = ["blobmesh", *rel.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(rel: str, tree: ast.Module) -> Iterator[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import in the tree."""
    here = module_of(rel).split(".")
    if not rel.endswith("__init__.py"):
        here = here[:-1]  # a relative import starts from the module's package
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[:len(here) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base, [a.name for a in node.names]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def upward_imports(files: Iterable[Source]) -> list[str]:
    wrong = []
    for rel, tree in files:
        pkg = package_of(rel)
        for line, target, _ in imports(rel, tree):
            if target.startswith("blobmesh."):
                other = target.split(".")[1]
                if other != pkg and LAYER[other] >= LAYER[pkg]:
                    wrong.append(f"{rel}:{line} {pkg} -> {other}")
    return wrong


def private_imports(files: Iterable[Source]) -> list[str]:
    return [f"{rel}:{line} {target}: {names}"
            for rel, tree in files for line, target, names in imports(rel, tree)
            if target.startswith("blobmesh") and any(private(n) for n in names)]


def private_reads(files: Iterable[Source]) -> list[str]:
    """``module._name`` where ``module`` is an imported blobmesh module (or anything
    imported from one: a class's private attribute is just as private)."""
    wrong = []
    for rel, tree in files:
        names = {(a.asname or a.name).split(".")[0]
                 for _, target, imported in imports(rel, tree) if target.startswith("blobmesh")
                 for a in _aliases(tree, target, imported)}
        wrong += [f"{rel}:{node.lineno} {node.value.id}.{node.attr}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in names and private(node.attr)]
    return wrong


def _aliases(tree: ast.Module, target: str, imported: list[str]) -> Iterator[ast.alias]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a for a in node.names if a.name == target and not imported)
        elif isinstance(node, ast.ImportFrom) and imported:
            yield from (a for a in node.names if a.name in imported)


def test_every_package_has_a_layer() -> None:
    found = {package_of(rel) for rel, _ in sources()}
    assert found - LAYER.keys() == set(), "give the new package a layer here and in the docs"


def test_packages_import_only_lower_layers() -> None:
    assert upward_imports(sources()) == []


def test_no_module_imports_another_modules_privates() -> None:
    assert private_imports(sources()) == []


def test_no_module_reads_another_modules_privates() -> None:
    assert private_reads(sources()) == []


def test_the_checks_find_what_they_are_for() -> None:
    bad = [("store/gc.py", ast.parse(
        "from blobmesh.node.daemon import Node\n"  # upward
        "from ..transfer import manager\n"         # upward, relative
        "from blobmesh.hashing.tree import _leaf\n"  # a private name
        "import blobmesh.wire.frames as frames\n"
        "from blobmesh.store.partial import PartialBlob\n"
        "def f():\n    return frames._HEADER, PartialBlob._settle\n"))]
    assert upward_imports(bad) == ["store/gc.py:1 store -> node",
                                   "store/gc.py:2 store -> transfer"]
    assert private_imports(bad) == ["store/gc.py:3 blobmesh.hashing.tree: ['_leaf']"]
    assert private_reads(bad) == ["store/gc.py:7 frames._HEADER",
                                  "store/gc.py:7 PartialBlob._settle"]
