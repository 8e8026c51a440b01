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


# The package's layers, bottom first: a module may import its own layer and the layers below it, never one above.
# The noise processes sit below the models (a model family names the process it was trained with); the samplers,
# which drive a model, sit above them with the data. eval and analysis (sampling, metrics, attention statistics) are
# below train, whose testbed card and classifier trainer measure with them. recipe.py validates names from the
# bottom vocabularies (slots, layer selectors, operators) and the train loop's config, and graft runs it.
LAYERS = (
    ("ditgraft", "ditgraft.utils", "ditgraft.distributed", "ditgraft.argtypes", "ditgraft.slots", "ditgraft.layers"),
    ("ditgraft.operators", "ditgraft.diffusion.gaussian", "ditgraft.diffusion.flow_matching"),
    ("ditgraft.models",),
    ("ditgraft.data", "ditgraft.diffusion", "ditgraft.flops"),
    ("ditgraft.eval", "ditgraft.analysis"),
    ("ditgraft.train",),
    ("ditgraft.recipe",),
    ("ditgraft.graft",),
    ("ditgraft.explore", "ditgraft.export", "ditgraft.bench", "ditgraft.cli", "ditgraft.api"),
    ("ditgraft.__main__",),  # python -m ditgraft: the command line
)


def layer_of(module: str, layers=LAYERS) -> int:
    """Index in ``layers`` of the longest prefix naming ``module`` (a module or a package above it)."""
    best = None
    for i, names in enumerate(layers):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (i, n)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS; add it to one")
    return best[0]


def back_edges(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """'importer (layer i) imports imported (layer j > i)' for every import up the layers."""
    out = []
    for m in sorted(graph):
        for d in sorted(graph[m]):
            if layer_of(d, layers) > layer_of(m, layers):
                out.append(f"{m} (layer {layer_of(m, layers)}) imports {d} (layer {layer_of(d, layers)})")
    return out


def test_the_layer_check_finds_a_back_edge(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pkg.high import b\n")
    (pkg / "high.py").write_text("from pkg.low import a\nb = 1\n")
    layers = (("pkg",), ("pkg.low",), ("pkg.high",))
    assert back_edges(import_graph(package_modules(str(pkg))), layers) == [
        "pkg.low.a (layer 1) imports pkg.high (layer 2)"]


def test_imports_go_down_the_layers():
    graph = import_graph(package_modules())
    for m in graph:
        layer_of(m)  # every module has a layer
    bad = back_edges(graph)
    assert not bad, "imports up the layers:\n" + "\n".join(bad)
