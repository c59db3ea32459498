"""The package's import graph has no cycles, and every configured protocol has its class.

A cycle (wire importing the runtime while the runtime imports wire; cli and commands
importing each other) makes the order of imports matter and the layers meaningless. Imports
inside functions count too: they are the usual way such cycles hide (imports for type
checking only do not).
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import linewatch
from linewatch.config import EndpointConfig, PublishConfig
from linewatch.runtime.ingest import FRAME_PROTOCOLS, Ingest
from linewatch.runtime.publish import Publisher
from linewatch.runtime.transport import VERDICT_PUBLISHERS, FrameSource, VerdictPublisher

ROOT = Path(linewatch.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in modules and t != name and modules[t].name != "__init__.py"}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "linewatch.wire" in graph and graph["linewatch.cli"]  # the walk found the package
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the finder finds one
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_wire_format_depends_on_nothing_of_the_runtime() -> None:
    assert not {m for m in import_graph()["linewatch.wire"] if m.startswith("linewatch.runtime")}


def test_every_configured_protocol_has_a_class() -> None:
    endpoint_protocols = typing.get_args(EndpointConfig.model_fields["protocol"].annotation)
    assert set(endpoint_protocols) == set(FRAME_PROTOCOLS)
    assert set(typing.get_args(PublishConfig.model_fields["protocol"].annotation)) == set(VERDICT_PUBLISHERS)


def test_ingest_and_publisher_have_what_the_daemon_uses() -> None:
    for cls, protocol in ((Ingest, FrameSource), (Publisher, VerdictPublisher)):
        wanted = {n for n in dir(protocol) if not n.startswith("_")} | set(protocol.__annotations__)
        missing = {n for n in wanted if not hasattr(cls, n) and n not in ("bound_urls", "bound_url")}
        assert not missing, (cls.__name__, missing)
