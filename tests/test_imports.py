"""The package's import graph has no cycles: every import of a ditgraft module counts, at module level or inside a
function (a function-level import that breaks a cycle at run time still ties the two files together)."""
import ast
import os

import ditgraft

ROOT = os.path.dirname(os.path.abspath(ditgraft.__file__))

# bench/common.py still holds the bench command line, which imports bench/model.py and bench/ops.py back; once that
# command line lives in its own module this set is empty (the test checks that every entry still is a cycle).


def package_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every module of the package at ``root``."""
    top = os.path.dirname(root)
    mods = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
                mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a.b import c`` imports a.b, and a.b.c if c is a module)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a list of modules, first == last) per back edge of a depth-first search."""
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return cycles


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    cycles = find_cycles(import_graph(package_modules(str(pkg))))
    assert cycles == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_no_import_cycles():
    graph = import_graph(package_modules())
    assert len(graph) > 40 and "ditgraft.operators.hyena" in graph["ditgraft.operators"]
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_operator_registry_is_a_leaf():
    graph = import_graph(package_modules())
    assert not {m for m in graph["ditgraft.operators.registry"] if m.startswith("ditgraft.operators")}
