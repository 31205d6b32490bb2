"""pyproject promises Python 3.10, while CI runs 3.11: a 3.11-only piece of the language
or the standard library would pass CI and break every 3.10 user at import (it happened
once, with ``tomllib``). This walks every source file of the project and its tests with
a 3.10 grammar and a list of the standard library's names added after 3.10."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOOR = (3, 10)
PACKAGES = ("engine", "builders", "benchmarks", "kernels", "tests")

# Standard-library names that 3.10 lacks (3.11 and 3.12 additions a project like this
# might reach for); a module mapped to None is new as a whole.
NEWER: dict[str, frozenset[str] | None] = {
    "tomllib": None,
    "wsgiref.types": None,
    "typing": frozenset({
        "Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type",
        "Required", "NotRequired", "TypeVarTuple", "Unpack", "dataclass_transform",
        "get_overloads", "clear_overloads", "override", "TypeAliasType",
    }),
    "enum": frozenset({
        "StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember",
        "global_enum", "show_flag_values",
    }),
    "datetime": frozenset({"UTC"}),
    "hashlib": frozenset({"file_digest"}),
    "contextlib": frozenset({"chdir"}),
    "asyncio": frozenset({"TaskGroup", "timeout", "timeout_at", "Runner", "Barrier"}),
    "itertools": frozenset({"batched"}),
    "math": frozenset({"cbrt", "exp2", "sumprod"}),
    "operator": frozenset({"call"}),
    "logging": frozenset({"getLevelNamesMapping", "getHandlerByName", "getHandlerNames"}),
    "inspect": frozenset({"getmembers_static", "markcoroutinefunction"}),
    "re": frozenset({"NOFLAG"}),
    "sys": frozenset({"exception", "activate_stack_trampoline", "monitoring"}),
    "os": frozenset({"EFD_CLOEXEC", "eventfd", "splice"}),
}
NEWER_BUILTINS = frozenset({"ExceptionGroup", "BaseExceptionGroup"})
NEWER_METHODS = frozenset({"add_note"})  # BaseException.add_note


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a ``try`` whose handlers catch ImportError (the fallback idiom)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def newer_than_floor(source: str, filename: str = "<source>") -> list[str]:
    """Where ``source`` needs a Python newer than :data:`FLOOR`, as "line: what" strings."""
    try:
        tree = ast.parse(source, filename, feature_version=FLOOR)
    except SyntaxError as exc:
        return [f"{exc.lineno}: syntax newer than {FLOOR[0]}.{FLOOR[1]} ({exc.msg})"]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    modules: dict[str, str] = {}  # local name -> module, from `import m [as n]`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if NEWER.get(alias.name, ()) is None and not _guarded(node, parents):
                    found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            new = NEWER.get(node.module, ())
            if _guarded(node, parents):
                continue
            if new is None:
                found.append(f"{node.lineno}: from {node.module} import ...")
            else:
                found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name in new]
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name):
                module = modules.get(node.value.id)
                new = NEWER.get(module, ()) if module else ()
                if new and node.attr in new and not _guarded(node, parents):
                    found.append(f"{node.lineno}: {module}.{node.attr}")
            if node.attr in NEWER_METHODS:
                found.append(f"{node.lineno}: .{node.attr}()")
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            found.append(f"{node.lineno}: {node.id}")
    return sorted(set(found), key=lambda s: int(s.split(":")[0]))


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 50, f"expected the project's sources under {PACKAGES}, found {len(files)}"
    return files


def test_pyproject_still_promises_the_floor_checked_here():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r'^requires-python\s*=\s*">=(\d+)\.(\d+)"', text, flags=re.M)
    assert found and (int(found[1]), int(found[2])) == FLOOR


@pytest.mark.parametrize(
    "snippet, what",
    [
        ("import tomllib\n", "import tomllib"),
        ("from typing import Any, Self\n", "from typing import Self"),
        ("import hashlib as h\nh.file_digest(f, 'sha256')\n", "hashlib.file_digest"),
        ("import enum\nclass K(enum.StrEnum):\n    A = 'a'\n", "enum.StrEnum"),
        ("try:\n    pass\nexcept* ValueError:\n    pass\n", "syntax newer"),
        ("raise ExceptionGroup('x', [ValueError()])\n", "ExceptionGroup"),
        ("def f(e):\n    e.add_note('more')\n", ".add_note()"),
        ("type Alias = int\n", "syntax newer"),
    ],
)
def test_the_check_finds_what_310_lacks(snippet, what):
    found = newer_than_floor(snippet)
    assert len(found) == 1 and what in found[0], found


def test_the_check_lets_the_fallback_idiom_and_310_names_through():
    ok = (
        "try:\n    import tomllib\nexcept ModuleNotFoundError:\n    import tomli as tomllib\n"
        "from typing import Any, Literal\nimport enum, hashlib\nclass K(str, enum.Enum):\n    A = 'a'\n"
        "hashlib.sha256(b'')\nmatch 1:\n    case _:\n        pass\n"
    )
    assert newer_than_floor(ok) == []


def test_every_source_file_runs_on_the_oldest_python_promised():
    problems = [
        f"{path.relative_to(ROOT)}:{where}"
        for path in _sources()
        if path.resolve() != Path(__file__).resolve()  # this file names them on purpose
        for where in newer_than_floor(path.read_text(encoding="utf-8"), str(path))
    ]
    assert problems == [], f"needs Python newer than {FLOOR[0]}.{FLOOR[1]}: {problems}"
