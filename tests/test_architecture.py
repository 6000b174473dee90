"""The package's shape: data flows one way, modules keep their private names, functions stay short.

These read the source (ast), so they fail the moment a change breaks a rule, with the place named.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60
# the CLI's argument tables: long because they list every flag, not because they do much
LONG_ALLOWED = {(f"scdca.cli.{m}", "add_commands") for m in ("data", "bench", "models", "annotate")}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted((SRC / "scdca").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


MODULES = _modules()


# The declared layers, lowest first (DECISIONS.md D47). A module may import its own wing and the
# wings of lower layers only; two wings of one layer (models, annotation) never import each other.
LAYERS = (
    ("scdca.errors",),
    ("scdca.registry", "scdca.storage"),
    ("scdca.chem",),
    ("scdca.data",),
    ("scdca.nn",),
    ("scdca.models", "scdca.annotation"),
    ("scdca.intervals",),
    ("scdca.predict",),
    ("scdca.eval",),
    ("scdca.cli",),
    ("scdca",),  # the package's face: it hands on names from below
)


def _imports(tree: ast.Module):
    """Every import of a scdca module, wherever it stands (inside functions and under
    `if TYPE_CHECKING:` too: a type-only import ties the layers as much as any other)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scdca"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("scdca"):
                    yield alias.name, []


def _runtime_imports(tree: ast.Module):
    """ImportFrom nodes that run (not those under `if TYPE_CHECKING:`)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in skip]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, (_, tree) in MODULES.items():
        deps = set()
        for module, names in _imports(tree):
            deps |= {f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names} or {module}
        graph[name] = {d for d in deps if d != name and not d.startswith(name + ".")}
    return graph


def _wing(module: str) -> tuple[int, str]:
    """(layer, wing) of a module: the longest wing name it is, or lies inside."""
    found = [
        (layer, w) for layer, wings in enumerate(LAYERS) for w in wings if module == w or module.startswith(w + ".")
    ]
    assert found, f"{module} is in no declared layer: add it to LAYERS (and to DECISIONS.md D47)"
    return max(found, key=lambda lw: len(lw[1]))


def against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module to another wing at its own layer or above, as 'a -> b'."""
    bad = []
    for name, deps in sorted(graph.items()):
        layer, wing = _wing(name)
        for dep in sorted(deps):
            dep_layer, dep_wing = _wing(dep)
            if dep_wing != wing and dep_layer >= layer:
                bad.append(f"{name} -> {dep} ({wing} is layer {layer}, {dep_wing} layer {dep_layer})")
    return bad


def test_every_import_follows_the_declared_layers():
    bad = against_the_layers(_graph())
    assert not bad, f"imports against the layer order (tests/test_architecture.py LAYERS): {bad}"


def test_the_layer_check_catches_an_import_upward_or_across():
    # the check itself: a data module importing models, and models importing annotation, are refused
    graph = {"scdca.data.screen": {"scdca.models.base"}, "scdca.models.base": {"scdca.annotation.config"}}
    assert len(against_the_layers(graph)) == 2
    assert not against_the_layers({"scdca.models.base": {"scdca.data.screen", "scdca.models.stack"}})


def test_no_import_circle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import circles: {cycles}"


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{name} imports {node.module}.{alias.name}"
        for name, (_, tree) in MODULES.items()
        for node in _runtime_imports(tree)
        if node.module and node.module.startswith("scdca")
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not private, private


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_is_in_its_first_line(name):
    doc = ast.get_docstring(MODULES[name][1])
    assert doc and len(doc.splitlines()[0]) > 20, f"{name}: no module docstring, or its first line says too little"


def _code_lines(node) -> int:
    """Lines of a function from its `def` to its end, its docstring not counted."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{name}.{node.name}: {_code_lines(node)} lines"
        for name, (_, tree) in MODULES.items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and _code_lines(node) > MAX_FUNCTION_LINES
        and (name, node.name) not in LONG_ALLOWED
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
