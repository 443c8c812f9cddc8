"""The import graph of lpreg has no cycle, and the op layers import only downwards.

Every `import` / `from ... import` in lpreg/ and kernels/ (installed as lpreg.kernels) is an edge,
function-local ones included: a lazy import hides a cycle from Python, not from a reader. Names
imported from a package resolve to the submodule when one exists, else to the package itself.
`importlib.import_module` is an import too: in a module that calls it, every string constant that
names an lpreg module (a literal argument, or an entry of a table such as lpreg._backends'
`_MODULES`) is an edge.
"""

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _modules():
    """{module name: path} for lpreg.* and lpreg.kernels.*."""
    out = {}
    for top, package in (("lpreg", "lpreg"), ("kernels", "lpreg.kernels")):
        base = os.path.join(ROOT, top)
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def _is_package(path):
    return os.path.basename(path) == "__init__.py"


def import_graph():
    """{module: set of lpreg modules it imports}."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if _is_package(path) else mod.rsplit(".", 1)[0]
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        dynamic = any(isinstance(n, ast.Attribute) and n.attr == "import_module" for n in ast.walk(tree))
        for node in ast.walk(tree):
            if dynamic and isinstance(node, ast.Constant) and node.value in mods and node.value != mod:
                graph[mod].add(node.value)  # a module loaded by name (importlib.import_module)
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # lpreg._C, the compiled extension, is a leaf: it imports nothing of lpreg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                           if f"{base}.{a.name}" != "lpreg._C"]
            else:
                continue
            for t in targets:
                while t and t not in mods and "." in t:  # `import lpreg.trainer.x as y` and the like
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph):
    """A list of modules forming a cycle, or None (iterative DFS, three colours)."""
    colour = {m: 0 for m in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycle_in_lpreg():
    graph = import_graph()
    assert len(graph) > 30 and "lpreg._contract" in graph and "lpreg.kernels.token_stats" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_detector_finds_a_cycle():
    """The checker itself can fail: a lazy back-edge makes a cycle it reports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert find_cycle(graph) is None
    graph["c"].add("a")
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_importlib_strings_are_edges_and_a_table_back_edge_is_a_cycle(tmp_path, monkeypatch):
    """The backend table once lived in the contract (the bottom layer) and named the backends as strings:
    lpreg._contract -> lpreg._native -> lpreg._contract, a cycle only the strings show."""
    graph = import_graph()
    named = {"lpreg._native", "lpreg._token_stats_torch_backend", "lpreg.kernels.token_stats"}
    assert named <= graph["lpreg._backends"]
    old = tmp_path / "old_contract.py"
    old.write_text('import importlib\n_MODULES = {"token_stats": {"cpu": "lpreg._native"}}\n\n'
                   'def implementation(name):\n    return importlib.import_module(_MODULES["token_stats"][name])\n')
    real = _modules
    monkeypatch.setitem(globals(), "_modules", lambda: {**real(), "lpreg._contract": str(old)})
    cycle = find_cycle(import_graph())
    assert cycle is not None and "lpreg._contract" in cycle and "lpreg._native" in cycle, cycle


def test_op_layers_import_only_downwards():
    """Public API -> op glue -> the backend table -> backends -> the contract: no glue imports another op's
    glue, no backend imports another backend, any glue or the backend table, and the contract imports
    nothing of lpreg."""
    graph = import_graph()
    glue = {m for m in graph if m.endswith("_ops") and m.startswith("lpreg._")}
    backends = {m for m in graph if m.endswith("_torch_backend")} | {"lpreg._native"} | {
        m for m in graph if m.startswith("lpreg.kernels.") and not m.startswith("lpreg.kernels._")}
    assert glue == {"lpreg._token_stats_ops", "lpreg._sparse_proxy_ops"}
    assert graph["lpreg._contract"] == set()
    assert all("lpreg._backends" in graph[g] for g in glue)
    for g in glue:
        assert not (graph[g] & (glue - {g})), (g, graph[g])
    for b in backends:
        assert not (graph[b] & (backends | glue | {"lpreg._backends"})), (b, graph[b] & (backends | glue))


def trainer_imports_of_experiments(graph):
    """(importer, imported) pairs by which a module of lpreg.trainer imports lpreg.experiments: the loop
    imports none; a study registers through the trainer's registration points (tasks, presets, instruments)."""
    def under(m, package):
        return m == package or m.startswith(package + ".")
    return sorted((m, t) for m, targets in graph.items() if under(m, "lpreg.trainer")
                  for t in targets if under(t, "lpreg.experiments"))


def test_the_trainer_imports_no_experiment():
    """lpreg.trainer never imports lpreg.experiments (function-local imports included); the other way is
    allowed. The deprecated `python -m lpreg.trainer.compare` runs the sweep by name (runpy): no edge."""
    graph = import_graph()
    assert "lpreg.trainer.loop" in graph and "lpreg.experiments.compare" in graph
    assert "lpreg.trainer.update" in graph["lpreg.experiments.mechanism"]
    assert trainer_imports_of_experiments(graph) == []


def test_the_trainer_rule_finds_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a trainer module with a lazy import of an experiment is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from lpreg.experiments import mechanism\n    return mechanism\n")
    real = _modules
    monkeypatch.setitem(globals(), "_modules", lambda: {**real(), "lpreg.trainer.bad": str(bad)})
    assert trainer_imports_of_experiments(import_graph()) == [("lpreg.trainer.bad", "lpreg.experiments.mechanism")]
