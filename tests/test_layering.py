"""The package's import graph: no cycles, the layers of docs/architecture.md in order, and every
configured protocol has its class.

A cycle (wire importing the runtime while the runtime imports wire; cli and commands
importing each other) makes the order of imports matter and the layers meaningless. Imports
inside functions count too: they are the usual way such cycles hide; so do imports for type
checking only (a type that two modules need both ways belongs in a third).
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import linewatch
from linewatch.config import EndpointConfig, PublishConfig
from linewatch.runtime.transport.ingest import FRAME_PROTOCOLS, Ingest
from linewatch.runtime.transport.publish import Publisher
from linewatch.runtime.transport import VERDICT_PUBLISHERS, FrameSource, VerdictPublisher

ROOT = Path(linewatch.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The linewatch modules `source` imports: at the top, inside functions and under
    `if TYPE_CHECKING:` alike (`from a.b import c` counts for a.b, and for a.b.c when c is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & modules


def import_graph(packages: bool = False) -> dict[str, set[str]]:
    """module -> the modules it imports. packages=False leaves out imports of a package's
    __init__ (a registry package imports its plug-ins, which import its base classes back)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = imports_of(path.read_text(), set(paths)) - {name}
        graph[name] = {t for t in edges if packages or paths[t].name != "__init__.py"}
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


# docs/architecture.md, "Layers": lowest first; a module imports from its own layer and the ones
# before it. A module belongs to the layer of the longest prefix that names it.
LAYERS = [
    ("records", ["linewatch", "linewatch.wire", "linewatch.config", "linewatch.images"]),
    ("detector", ["linewatch.detector"]),
    ("pictures", ["linewatch.overlay"]),
    ("operations", ["linewatch.runtime", "linewatch.runtime.ops"]),
    ("pipeline core", ["linewatch.runtime.pipeline"]),
    ("transports", ["linewatch.runtime.transport"]),
    ("sinks", ["linewatch.runtime.sinks"]),
    ("daemon", ["linewatch.runtime.daemon", "linewatch.runtime.changeover", "linewatch.runtime.systemd",
                "linewatch.runtime.selfcheck"]),
    ("actuator", ["linewatch.actuate"]),
    ("commands", ["linewatch.cli", "linewatch.commands", "linewatch.demo", "linewatch.recipe", "linewatch.bank_builder",
                  "linewatch.good_images",
                  "linewatch.selfcheck_references", "linewatch.config_cli", "linewatch.archive_cli", "linewatch.eval", "linewatch.sim"]),
]


def layer_of(module: str) -> int:
    best, rank = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) >= len(best):
                best, rank = prefix, i
    assert rank is not None and best != "linewatch" or module == "linewatch", f"{module} is in no layer of LAYERS"
    return rank


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_every_module_imports_only_its_own_layer_and_those_below() -> None:
    graph = import_graph(packages=True)
    assert upward_imports({"linewatch.wire": {"linewatch.runtime.daemon"}}) == [
        "linewatch.wire (records) imports linewatch.runtime.daemon (daemon)"]  # the check sees one
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_imports_for_type_checking_and_inside_functions_count() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from linewatch.cli import main\n"
              "def f():\n    import linewatch.demo\n")
    assert imports_of(source, {"linewatch.cli", "linewatch.demo", "linewatch.wire"}) == {"linewatch.cli", "linewatch.demo"}


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
