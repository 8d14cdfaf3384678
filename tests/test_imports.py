"""The package's modules import one another in one direction only.

Read from the source with `ast`, so every import counts: at module level, inside
functions (the usual way to hide a cycle) and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import asgi_gateway

PACKAGE = "asgi_gateway"
ROOT = Path(asgi_gateway.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[str]:
    """The package's modules that `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            # `from . import name` may name a submodule rather than an attribute.
            names = [source, *(f"{source}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name in MODULES and name != module:
                yield name


GRAPH = {module: sorted(set(_imported(module, path))) for module, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle, as the modules along it (the first one again at the end), or None."""
    done: set[str] = set()
    for root in GRAPH:
        if root in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(GRAPH[root]))]
        path.append(root)
        on_path.add(root)
        while stack:
            module, targets = stack[-1]
            target = next(targets, None)
            if target is None:
                stack.pop()
                path.pop()
                on_path.discard(module)
                done.add(module)
            elif target in on_path:
                return [*path[path.index(target) :], target]
            elif target not in done:
                stack.append((target, iter(GRAPH[target])))
                path.append(target)
                on_path.add(target)
    return None


def test_the_graph_is_read() -> None:
    # A parser that found nothing would pass every test below.
    assert "asgi_gateway._telemetry" in GRAPH["asgi_gateway._stack"]
    assert "asgi_gateway._layers.retry" in GRAPH["asgi_gateway._stack"]
    # Imported inside a function, and under TYPE_CHECKING.
    assert "asgi_gateway._websocket" in GRAPH["asgi_gateway._middleware"]
    assert "asgi_gateway._config" in GRAPH["asgi_gateway._types"]


def test_no_module_imports_one_that_imports_it_back() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_layers_never_import_what_sits_above_them() -> None:
    above = {"asgi_gateway._middleware", "asgi_gateway._proxy", "asgi_gateway._websocket"}
    wrong = {
        module: sorted(above & set(imported))
        for module, imported in GRAPH.items()
        if module.startswith("asgi_gateway._layers.") and above & set(imported)
    }
    assert not wrong, wrong


def test_the_semantic_conventions_are_a_leaf() -> None:
    assert set(GRAPH["asgi_gateway._semconv"]) <= {"asgi_gateway._types", "asgi_gateway._exceptions"}
