"""Imports run one way: no cycles among the project's modules, no module imports a training script
(the scripts may call evaluate.py's metrics), and model.py / losses.py import no project module.
The graph is read from the source with ast, so nothing is imported or run."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train_text", "train_clip", "evaluate", "bench"}
ALLOWED_SCRIPT_IMPORTS = {("train_text", "evaluate"), ("train_clip", "evaluate")}


def import_graph(root):
    """{module: set of project modules it imports} for the .py files at the top of root."""
    mods = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(root, m + ".py")).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[m] = (deps & mods) - {m}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
    state = {}  # module -> "open" while on the stack, "done" after

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d, stack + [d])):
                return cycle
        state[m] = "done"
        return None
    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def rule_breaks(graph):
    breaks = [f"{m} imports the script {d}" for m, deps in graph.items() for d in deps
              if d in SCRIPTS and (m, d) not in ALLOWED_SCRIPT_IMPORTS and m != "bench"]
    breaks += [f"{m} imports project modules {sorted(graph[m])}" for m in ("model", "losses") if graph.get(m)]
    return breaks


def test_project_imports_run_one_way():
    graph = import_graph(ROOT)
    assert {"model", "losses", "data", "train_text", "train_clip", "evaluate"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert rule_breaks(graph) == []


def test_the_check_sees_a_cycle_and_a_script_import(tmp_path):
    """The checker itself on a hand-made tree: it must report what it is there to catch."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from c import x\n")
    (tmp_path / "c.py").write_text("import os\nimport a\n")
    (tmp_path / "model.py").write_text("import torch\nimport train_text\n")
    (tmp_path / "train_text.py").write_text("import evaluate\n")
    (tmp_path / "evaluate.py").write_text("import model\n")
    graph = import_graph(str(tmp_path))
    assert find_cycle(graph) in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    breaks = rule_breaks(graph)
    assert "model imports the script train_text" in breaks
    assert "model imports project modules ['train_text']" in breaks
    assert not any(b.startswith("train_text") for b in breaks)  # the one allowed script import
