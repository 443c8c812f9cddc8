"""The import graph of lpreg has no cycle, and the op layers import only downwards.

Every `import` / `from ... import` in lpreg/ and kernels/ (installed as lpreg.kernels) is an edge,
function-local ones included: a lazy import hides a cycle from Python, not from a reader. Names
imported from a package resolve to the submodule when one exists, else to the package itself.
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
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
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


def test_op_layers_import_only_downwards():
    """Public API -> op glue -> backends -> the contract: no glue imports another op's glue, no backend
    imports another backend or any glue, and the contract imports nothing of lpreg."""
    graph = import_graph()
    glue = {m for m in graph if m.endswith("_ops") and m.startswith("lpreg._")}
    backends = {m for m in graph if m.endswith("_torch_backend")} | {"lpreg._native"} | {
        m for m in graph if m.startswith("lpreg.kernels.") and not m.startswith("lpreg.kernels._")}
    assert glue == {"lpreg._token_stats_ops", "lpreg._sparse_proxy_ops"}
    assert graph["lpreg._contract"] == set()
    for g in glue:
        assert not (graph[g] & (glue - {g})), (g, graph[g])
    for b in backends:
        assert not (graph[b] & (backends | glue)), (b, graph[b] & (backends | glue))
