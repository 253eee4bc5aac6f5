"""The house's layers: the package `pipeline` is the library. Its modules import one another without a
circle (imports at module level; those inside functions or under TYPE_CHECKING run later), and nothing in it
imports the stages, benchmarks or tests that are built on it."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = ("stages", "benchmarks", "tests", "conftest")  # built on the library, never below it


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((REPO / "pipeline").rglob("*.py"))}


def imported(node: ast.stmt) -> list[str]:
    """Every module name an import statement names, with `from m import x` also naming m.x."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return []


def module_level(tree: ast.Module) -> list[ast.stmt]:
    """The statements that run on import: the body, and the bodies of its if/try blocks, but not of
    `if TYPE_CHECKING:`."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level (a dotted name is its packages' imports too,
    but a module's own packages are not: a package's __init__ importing its modules is no circle)."""
    edges = {}
    for name, path in MODULES.items():
        targets = set()
        for node in module_level(ast.parse(path.read_text())):
            for target in imported(node):
                parts = target.split(".")
                targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(MODULES)
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges[name] = targets - own
    return edges


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the modules along it, or None."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    return next((found for node in sorted(edges) if node not in state and (found := visit(node))), None)


def test_the_package_imports_no_circle():
    assert circle(graph()) is None, " -> ".join(circle(graph()))


def test_the_circle_finder_finds_one():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_nothing_in_the_package_imports_stages_benchmarks_or_tests():
    offending = sorted(f"{name} imports {target}" for name, path in MODULES.items()
                       for node in ast.walk(ast.parse(path.read_text())) for target in imported(node)
                       if target.split(".")[0] in OUTSIDE)
    assert not offending, "; ".join(offending)


def test_stages_are_thin():
    """Each stage reads its config and calls one library function: at most 60 lines."""
    long = {path.name: n for path in (REPO / "stages").glob("*.py") if (n := len(path.read_text().splitlines())) > 60}
    assert not long, long
