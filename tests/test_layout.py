"""The library's layout by concept: lower layers never import higher ones; no module is too long."""

import ast
from pathlib import Path

import mechunlearn_utils

PACKAGE = Path(mechunlearn_utils.__file__).parent
# Dependency order: a module may import its own layer or a lower one (never a higher one).
LAYERS = {"core": 0, "data": 1, "interp": 2, "localize": 2, "edit": 3, "evaluate": 3,
          "attacks": 4, "viz": 5, "workbook": 6}
MAX_LINES = 650  # the rule is ~600


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every mechunlearn_utils module `path` imports, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mechunlearn_utils import attacks` imports mechunlearn_utils.attacks
            names = [node.module] if node.module.count(".") else [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] == "mechunlearn_utils"]
    return out


def _layer_of(dotted: str):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in _modules() if p.parent != PACKAGE}
    assert subpackages <= set(LAYERS), f"subpackages without a layer: {sorted(subpackages - set(LAYERS))}"


def test_lower_layers_never_import_higher_ones():
    offenders = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2:
            continue  # the top-level package (__init__, __main__) may use everything
        own = rel.parts[0]
        for line, name in _imports(path):
            target = _layer_of(name)
            if target is None and name != "mechunlearn_utils":
                continue
            if target is None or LAYERS[target] > LAYERS[own]:
                offenders.append(f"{rel}:{line} ({own}) imports {name}")
    assert not offenders, "imports against the layering:\n" + "\n".join(sorted(set(offenders)))


def test_no_import_cycle_between_modules():
    """Module-level and lazy imports together form no cycle (a cycle means two concepts tangled)."""
    def module_name(path):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    known = {module_name(p) for p in _modules()}
    graph = {}
    for path in _modules():
        deps = set()
        for _, name in _imports(path):
            while name and name not in known:
                name = name.rpartition(".")[0]
            own = module_name(path)
            if path.name == "__init__.py" and name.startswith(own + "."):
                continue  # a package re-exporting its own modules
            if name and name != own and name != "mechunlearn_utils":
                deps.add(name)
        graph[module_name(path)] = deps
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_is_over_the_length_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
