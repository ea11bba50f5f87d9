"""The layout docs/DESIGN.md draws: the stages on top, the machinery beneath them in ept/.

Stages link by files on disk, so no stage imports another. model.py is the one exception: it is the
methods themselves (as nanoGPT's train.py imports its model.py), so every stage and ept/ may import it.
ept/ imports no stage but model.py, and nothing has an import cycle (lazy imports count), with one
exception: ept/pack.py, the pack accelerator beneath train.py, builds, validates, checkpoints and
finishes its runs with train.py's own functions, so it imports train; train.py reaches it only
lazily, in the branch for several runs (that one edge is the one cycle allowed).
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"prepare_data", "model", "train", "evaluate", "fewshot", "ablate", "analyze", "report", "export"}
LIBRARIES = {"tables"}  # report.py's tables, which the drivers print too: beside report.py
ALLOWED = {"ept.pack": {"train"}}  # ept/pack.py runs train.py's pieces (above)
LAZY = ("train", "ept.pack")  # train.py's lazy import of the pack: the one cycle allowed


def imports(path):
    """The top-level names a file imports anywhere in its text (top level or inside a function);
    `from ept import files` counts as ept.files."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "ept" else {node.module}
    return names


def project_graph():
    """{module: the project modules it imports}, over the top-level scripts and ept/."""
    paths = {p.stem: p for p in REPO.glob("*.py")}
    paths |= {f"ept.{p.stem}": p for p in (REPO / "ept").glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imports(path) if m in paths} - {name} for name, path in paths.items()}


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


def test_the_top_level_holds_the_stages_only():
    assert {p.stem for p in REPO.glob("*.py")} == STAGES | LIBRARIES
    assert {p.name for p in (REPO / "scripts").glob("bench*.py")} == {"bench.py", "bench_pack.py"}


def test_no_stage_imports_another():
    graph = project_graph()
    assert {"train", "ablate", "ept.files", "ept.options"} <= set(graph)  # the walk saw both levels
    for name, deps in graph.items():
        stages = {d for d in deps if d in STAGES} - {"model"} - ALLOWED.get(name, set())
        assert not stages, f"{name} imports the stage(s) {sorted(stages)}: stages link by files"


def test_no_import_cycles():
    graph = project_graph()
    assert LAZY[1] in graph[LAZY[0]] and LAZY[0] in graph[LAZY[1]]  # the allowed cycle is there
    graph[LAZY[0]] = graph[LAZY[0]] - {LAZY[1]}
    assert find_cycle(graph) is None, find_cycle(graph)


def test_train_imports_the_pack_lazily_only():
    """The one-run path does not load the pack: train.py imports ept.pack inside a function only."""
    tree = ast.parse((REPO / "train.py").read_text())
    top = {f"{n.module}.{a.name}" for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
           for a in n.names}
    assert "ept.pack" not in top and "ept.pack" in imports(REPO / "train.py")


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    script = tmp_path / "x.py"
    script.write_text("import train\nfrom ept import files, tables\n\ndef f():\n    import evaluate\n")
    assert imports(script) == {"train", "ept.files", "ept.tables", "evaluate"}


def long_functions(path, limit=60):
    """(name, lines) of every function in `path` longer than `limit` lines (nested ones too)."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_ept_is_at_most_ten_modules_and_2500_lines_and_no_function_is_over_60_lines(tmp_path):
    """Issue 26's shape: ept/ holds at most ten modules and 2,500 lines; a function fits a screen (60 lines)."""
    modules = [p for p in (REPO / "ept").glob("*.py") if p.stem != "__init__"]
    assert 0 < len(modules) <= 10, sorted(p.stem for p in modules)
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "ept").iterdir() if p.suffix in (".py", ".sh"))
    assert 1000 < lines <= 2500, lines  # issue 26: the support package at most 2,500 lines
    code = [*REPO.glob("*.py"), *modules, *(REPO / "scripts").glob("*.py")]
    assert {str(p.relative_to(REPO)): f for p in code if (f := long_functions(p))} == {}
    script = tmp_path / "long.py"  # the check can fail
    script.write_text("def f():\n" + "    x = 1\n" * 60 + "\n\ndef g():\n    pass\n")
    assert long_functions(script) == [("f", 61)]


def closure(module="train"):
    """{module: lines} of every project module `module` imports at the top level, transitively (itself too):
    what a reader of train.py may have to open (issue 26 measures it; `python tests/test_layout.py` prints it)."""
    paths = {p.stem: p for p in REPO.glob("*.py")}
    paths |= {f"ept.{p.stem}": p for p in (REPO / "ept").glob("*.py") if p.stem != "__init__"}
    seen, todo = {}, [module]
    while todo:
        if (name := todo.pop()) not in seen:
            tree = ast.parse(text := paths[name].read_text())
            seen[name] = len(text.splitlines())
            for node in tree.body:  # top level only: the pack is imported in the branch for several runs
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names if a.name in paths]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    todo += [m for m in ([f"ept.{a.name}" for a in node.names] if node.module == "ept"
                                         else [node.module]) if m in paths]
    return seen


def test_train_reads_with_model_py_and_the_shared_helpers_only():
    """train.py's closure holds model.py and the helpers the stages share, never the drivers' machinery."""
    reached = closure("train")
    assert {"train", "model", "ept.runfolder", "ept.evaluation"} <= set(reached)
    assert not {"ept.grid", "ept.outputs", "ept.pack", "tables"} & set(reached), sorted(reached)
    assert {"ept.pack", "ept.grid"} <= set(closure("ablate")) | set(closure("ept.pack"))  # the check can fail


if __name__ == "__main__":
    for stage in ("train", "ept.pack"):
        counts = closure(stage)
        print(f"{stage}: {sum(counts.values())} lines in {len(counts)} files:",
              ", ".join(f"{m} {n}" for m, n in sorted(counts.items(), key=lambda x: -x[1])))
    ept = [p for p in (REPO / "ept").iterdir() if p.suffix in (".py", ".sh")]
    print(f"ept/: {sum(len(p.read_text().splitlines()) for p in ept)} lines in {len(ept)} files")
