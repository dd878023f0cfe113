"""The package's modules import one another in one direction: no circle, counting the imports made inside
functions (a deferred import hides a circle from Python, not from the reader)."""

import ast
from pathlib import Path

from tests.tokenizers_for_tests import REPO

PACKAGE = Path(REPO) / "minorsft_megatron"


def module_imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its text}."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import module` names a module too
                found.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
        graph[name] = {other for other in found if other in names and other != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path from its first module back to itself (depth-first search)."""
    found, done = [], set()

    def visit(module, path):
        for other in sorted(graph[module]):
            if other in path:
                circle = path[path.index(other):]
                start = circle.index(min(circle))  # each circle once, from its first module
                circle = circle[start:] + circle[:start]
                if circle + [circle[0]] not in found:
                    found.append(circle + [circle[0]])
            elif other not in done:
                visit(other, path + [other])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_circles_are_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"c"}, "c": {"b"}, "b": {"c"}}) == [["b", "c", "b"]]  # entered at c
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = module_imports()
    assert "minorsft_megatron.data.records" in graph["minorsft_megatron.data.formats"]
    assert circles(graph) == []
