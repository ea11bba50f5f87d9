"""The layout docs/DESIGN.md describes: no import cycle among the project's modules (lazy imports count)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_imports():
    """{module: project modules it imports anywhere in its text (top level or inside a function)}."""
    modules = {p.stem for p in REPO.glob("*.py")}
    graph = {}
    for path in REPO.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[path.stem] = names & modules - {path.stem}
    return graph


def find_cycle(graph):
    state, path = {}, []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return path[path.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = "done"
        path.pop()
        return None
    return next((c for u in sorted(graph) if u not in state and (c := visit(u))), None)


def test_no_import_cycles():
    graph = project_imports()
    assert {"train", "model", "files", "report", "ablate"} <= set(graph)  # the walk saw the modules
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
