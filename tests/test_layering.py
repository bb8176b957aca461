"""The package's layers: every module imports, the import graph has no cycle, and imports only go
down the layers that ARCHITECTURE.md draws (models know nothing of the loop, the loop knows no
HTTP, nothing below serving imports the web stack, only scale-out imports Ray)."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = [
    ("kernels", lambda m: m == "kernels" or m.startswith("kernels.")),
    ("base", lambda m: m in ("engine.sequence", "engine.context", "engine.weights", "engine.config",
                             "engine.default_model")),
    ("prompts", lambda m: m.startswith("engine.prompts")),
    ("models", lambda m: m.startswith("engine.models")),
    ("core", lambda m: m.startswith("engine.core")),
    ("api", lambda m: m in ("engine.api", "engine.classifier")),
    ("serving", lambda m: m.startswith("engine.serving")),
    ("scaleout", lambda m: m.startswith("engine.scaleout")),
    ("entry", lambda m: m in ("engine", "engine.cli")),
]
# Third-party packages a layer below the named one must not import (even lazily).
OWNED = {"fastapi": "serving", "starlette": "serving", "uvicorn": "serving", "pydantic": "serving",
         "prometheus_client": "serving", "ray": "scaleout", "pyarrow": "scaleout"}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for pkg in ("engine", "kernels") for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer_of(module: str) -> int:
    hits = [i for i, (_, match) in enumerate(LAYERS) if match(module)]
    assert len(hits) == 1, f"{module} is in {len(hits)} layers: add it to exactly one in LAYERS"
    return hits[0]


def imports_of(module: str) -> set:
    """Every module named by an import statement of ``module`` (function-level imports included)."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:  # ``from engine.core import steps`` names the module engine.core.steps
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return out


GRAPH = {m: {d for d in imports_of(m) if d in MODULES and d != m} for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def upward(graph) -> list:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in graph.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycles_of(graph) -> list:
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_imports_only_go_down():
    up = upward(GRAPH)
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_kernels_know_nothing_of_the_engine():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if m.startswith("kernels")
           for d in deps if d.startswith("engine")]
    assert not bad, bad


def test_third_party_stacks_stay_in_their_layer():
    names = [n for n, _ in LAYERS]
    bad = []
    for m in MODULES:
        for d in imports_of(m):
            owner = OWNED.get(d.split(".")[0])
            if owner is not None and layer_of(m) < names.index(owner):
                bad.append(f"{m} imports {d} (owned by {owner})")
    assert not bad, bad


def test_no_import_cycles():
    cycles = cycles_of(GRAPH)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_violations():
    """The rules are live: a made-up upward import and a made-up cycle are both reported."""
    assert upward({"engine.models.qwen3": {"engine.core.engine"}, "engine.core.runner": {"engine.models.qwen3"}}) \
        == ["engine.models.qwen3 (models) imports engine.core.engine (core)"]
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert "engine.core.steps.base" in GRAPH["engine.core.scheduler"]  # the parser sees real imports
