"""The import rules of docs/architecture.md, checked on the source (ast: every import statement, including
ones inside functions), and no import cycle between the modules of a package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "opd_client": ROOT / "client" / "opd_client",
    "opd_common": ROOT / "services" / "opd_common",
    "opd_teacher": ROOT / "services" / "teacher" / "opd_teacher",
    "opd_student": ROOT / "services" / "student" / "opd_student",
    "opd_bench": ROOT / "services" / "opd_bench",
    "opd_cli": ROOT / "services" / "opd_cli",
}
# package -> the first-party packages it may import (itself always)
ALLOWED = {
    "opd_client": set(),
    "opd_common": set(),
    "opd_teacher": {"opd_client", "opd_common"},
    "opd_student": {"opd_client", "opd_common"},
    "opd_bench": {"opd_client", "opd_common", "opd_teacher", "opd_student"},
    "opd_cli": {"opd_teacher", "opd_student", "opd_bench"},
}


def module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if path.name != "__init__.py":
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def sources():
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            if "v1" in path.relative_to(root).parts:  # generated stubs
                continue
            yield package, path, module_name(package, path)


def test_packages_import_only_what_the_rules_allow():
    problems = []
    for package, path, module in sources():
        for name in imports_of(path, module):
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                problems.append(f"{module} imports {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("where", "forbidden", "exempt"),
    [
        ("opd_teacher.batcher", ("torch", "transformers", "opd_teacher.backends"), ()),
        ("opd_teacher.backends", ("opd_teacher.http", "opd_teacher.grpc_server", "fastapi", "grpc"), ()),
        ("opd_teacher.engine", ("torch", "transformers", "opd_teacher.http", "fastapi"), ()),
        # The wire client needs no torch; the head module (hidden states -> logits) is the one exception.
        ("opd_client", ("torch", "transformers", "safetensors.torch"), ("opd_client.head",)),
        ("opd_student.losses", ("opd_student.",), ()),
    ],
)
def test_inner_rules(where, forbidden, exempt):
    hits = []
    for _package, path, module in sources():
        if (module != where and not module.startswith(where + ".")) or module in exempt:
            continue
        for name in imports_of(path, module):
            if any(name == f or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden):
                hits.append(f"{module} imports {name}")
    assert not hits, "\n".join(hits)


def test_no_import_cycles_inside_a_package():
    modules = {module: path for _package, path, module in sources()}
    graph = {
        module: {
            target
            for name in imports_of(path, module)
            for target in (name, name.rpartition(".")[0])
            if target in modules and target != module and not _is_package_of(target, module)
        }
        for module, path in modules.items()
    }
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def _is_package_of(target: str, module: str) -> bool:
    """`import a.b.c` runs a/__init__ and a/b/__init__: a parent package is not a dependency edge here."""
    return module.startswith(target + ".")
