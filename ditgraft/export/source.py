"""One self-contained Python module from ditgraft's own sources: the named objects plus everything of ditgraft's they
reach, so an exported model's modeling file never drifts from the library.

``bundle_source(roots)`` starts from ditgraft classes / functions and follows every global name their source reads:
a name bound at a ditgraft module's top level (class, function, constant) comes along with its source text, a name
imported from another ditgraft module is followed there, and a name imported from elsewhere (torch, numpy, diffusers)
keeps the import line of the module that uses it. Decorators from the operator registry are dropped (the bundle has
no registry), and two ditgraft objects with one name (``IMPLS`` in several operator files) get distinct names in the
bundle (the same names in every export: ``shared_names``), rewritten where their own module's code reads them.
Objects come out in dependency order, texts unchanged apart from those two edits, so comments and docstrings stay.

It refuses (``SelfContainedError``, naming the object and the reason) what it cannot carry over faithfully: an
object that is not a top-level ditgraft class or function, or whose source is unavailable; a ditgraft module used as
a module (``mod.f``); ditgraft imported inside a function.
"""
from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field

PACKAGE = "ditgraft"
DROPPED_DECORATORS = {("ditgraft.operators.registry", "register")}


class SelfContainedError(ValueError):
    """An object that cannot be carried into a self-contained module (the message says which and why)."""


def _is_ours(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


@dataclass
class _Module:
    name: str
    source: str
    tree: ast.Module
    bindings: dict = field(default_factory=dict)  # top-level name -> ("def", node) | ("import", text, from, orig)


def _bound_names(node: ast.stmt) -> list[str]:
    """Names a top-level statement binds (defs, classes, assignments, imports, also inside if / try blocks)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(node, (ast.If, ast.Try)):
        return [name for body in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                                  *[h.body for h in getattr(node, "handlers", [])]) for s in body
                for name in _bound_names(s)]
    return []


class Bundle:
    """Collects ditgraft objects and the imports they need; ``source()`` writes the module."""

    def __init__(self, provided: dict[str, str] | None = None):
        self.modules: dict[str, _Module] = {}
        self.provided = dict(provided or {})  # "module.NAME" -> source text that replaces the library's binding
        self.emitted: dict[tuple[str, str], str] = {}  # (module, name) -> name in the bundle
        self.taken: dict[str, tuple[str, str]] = {}
        self.order: list[tuple[str, str, str]] = []  # (module, name, text), dependencies first
        self.imports: list[str] = []
        self._active: set[tuple[str, str]] = set()

    # ---- reading modules -------------------------------------------------------------------------------------
    def _module(self, name: str) -> _Module:
        if name not in self.modules:
            mod = sys.modules.get(name) or importlib.import_module(name)
            try:
                text = inspect.getsource(mod)
            except (OSError, TypeError) as err:
                raise SelfContainedError(f"module {name}: its source is not available ({err})") from None
            tree = ast.parse(text)
            m = _Module(name, text, tree)
            for node in tree.body:
                if isinstance(node, ast.Import):
                    for a in node.names:
                        bound = a.asname or a.name.split(".")[0]
                        m.bindings[bound] = ("import", ast.get_source_segment(text, node) if len(node.names) == 1
                                             else f"import {a.name}" + (f" as {a.asname}" if a.asname else ""),
                                             a.name if a.asname else a.name.split(".")[0], None)
                elif isinstance(node, ast.ImportFrom):
                    if node.module == "__future__":
                        continue
                    src = (importlib.util.resolve_name("." * node.level + (node.module or ""), mod.__package__)
                           if node.level else node.module)
                    for a in node.names:
                        line = f"from {src} import {a.name}" + (f" as {a.asname}" if a.asname else "")
                        m.bindings[a.asname or a.name] = ("import", line, src, a.name)
                else:
                    for bound in _bound_names(node):
                        m.bindings.setdefault(bound, ("def", node))
            self.modules[name] = m
        return self.modules[name]

    # ---- collecting ------------------------------------------------------------------------------------------
    def add(self, obj) -> str:
        """Add a ditgraft class or function (and what it needs); returns its name in the bundle."""
        module = getattr(obj, "__module__", None)
        name = getattr(obj, "__qualname__", None)
        if not module or not _is_ours(module) or not name or "." in name:
            raise SelfContainedError(f"{obj!r} is not a top-level ditgraft class or function")
        return self._add(module, name)

    def _add(self, module: str, name: str) -> str:
        key = (module, name)
        if key in self.emitted:
            return self.emitted[key]
        if key in self._active:  # a cycle (a class naming itself, mutual recursion): its name is reserved already
            return self._reserve(key)
        self._active.add(key)
        try:
            new = self._reserve(key)
            text = self.provided.get(f"{module}.{name}")
            if text is None:
                text = self._collect(module, name, new)
            self.order.append((module, name, text))
            return new
        finally:
            self._active.discard(key)

    def _reserve(self, key: tuple[str, str]) -> str:
        if key in self.emitted:
            return self.emitted[key]
        module, name = key
        new = name
        if name in shared_names() or (new in self.taken and self.taken[new] != key):
            new = f"{name}__{module.rsplit('.', 1)[-1]}"
            if new in self.taken:
                raise SelfContainedError(f"{module}.{name}: two ditgraft objects would share the name {new}")
        self.taken[new] = key
        self.emitted[key] = new
        return new

    def _collect(self, module: str, name: str, new: str) -> str:
        m = self._module(module)
        binding = m.bindings.get(name)
        if binding is None:
            raise SelfContainedError(f"{module}.{name}: not defined at the top level of {module}")
        if binding[0] == "import":
            _, line, src, orig = binding
            if _is_ours(src) and orig is not None:  # re-exported: follow it to its home
                target = self._add(src, orig)
                return "" if new == target else f"{new} = {target}\n"
            raise SelfContainedError(f"{module}.{name} is a module or an import, not an object to carry over")
        node = binding[1]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        lines = m.source.splitlines(keepends=True)
        text_start = sum(len(x) for x in lines[:start - 1])
        text_end = sum(len(x) for x in lines[:node.end_lineno])
        edits: list[tuple[int, int, str]] = []  # (offset, length, replacement) in the module source

        def offset(lineno: int, col: int) -> int:
            return sum(len(x) for x in lines[:lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())

        for dec in getattr(node, "decorator_list", []):
            root = dec.func if isinstance(dec, ast.Call) else dec
            if isinstance(root, ast.Name) and self._home(m, root.id) in DROPPED_DECORATORS:
                a = offset(dec.lineno, dec.col_offset) - 1  # the "@"
                b = sum(len(x) for x in lines[:dec.end_lineno])  # through the line end
                edits.append((a, b - a, ""))
        if new != name and isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            at = lines[node.lineno - 1].index(name, node.col_offset)
            edits.append((offset(node.lineno, 0) + at, len(name), new))
        if new != name:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and sub.id == name and not isinstance(sub.ctx, ast.Load):
                    edits.append((offset(sub.lineno, sub.col_offset), len(name), new))
        for sub in ast.walk(node):
            if isinstance(sub, (ast.Import, ast.ImportFrom)) and sub is not node:
                src = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                if src and _is_ours(src):
                    raise SelfContainedError(f"{module}.{name} imports {src} inside its code; move the import to "
                                             "the module's top level")
        dropped = {id(d) for dec in getattr(node, "decorator_list", []) for d in ast.walk(dec)}
        for sub in _global_reads(node):
            if sub.id == name:  # the object reads its own name (a class in its methods, recursion)
                if new != name:
                    edits.append((offset(sub.lineno, sub.col_offset), len(name), new))
                continue
            if sub.id not in m.bindings or id(sub) in dropped and self._home(m, sub.id) in DROPPED_DECORATORS:
                continue  # a builtin, or a dropped decorator
            target = self._resolve(m, sub.id, f"{module}.{name}")
            if target != sub.id:
                edits.append((offset(sub.lineno, sub.col_offset), len(sub.id), target))
        text = m.source
        for at, length, rep in sorted(edits, reverse=True):
            text = text[:at] + rep + text[at + length:]
            text_end += len(rep) - length if at < text_end else 0
        return text[text_start:text_end].rstrip() + "\n"

    def _home(self, m: _Module, name: str) -> tuple[str, str] | None:
        binding = m.bindings.get(name)
        if binding is None:
            return None
        if binding[0] == "import":
            return (binding[2], binding[3]) if binding[3] is not None else None
        return (m.name, name)

    def _resolve(self, m: _Module, name: str, where: str) -> str:
        """The bundle's name for global ``name`` read by ``where`` (adding it or its import)."""
        binding = m.bindings[name]
        if binding[0] == "def":
            return self._add(m.name, name)
        _, line, src, orig = binding
        if _is_ours(src):
            if orig is None:
                raise SelfContainedError(f"{where} uses the ditgraft module {src} as a module; import the names "
                                         "it needs instead")
            return self._add(src, orig)  # the read is rewritten when the bundle names it differently
        if line not in self.imports:
            self.imports.append(line)
        return name

    # ---- writing ---------------------------------------------------------------------------------------------
    def source(self, header: str = "") -> str:
        parts = [header.rstrip() + "\n\n" if header else "", "from __future__ import annotations\n\n"]
        plain = sorted(i for i in self.imports if i.startswith("import "))
        froms = sorted(i for i in self.imports if i.startswith("from "))
        parts.append("\n".join(plain + froms) + "\n")
        for module, name, text in self.order:
            if text:
                parts.append(f"\n\n# ---- {module}.{name}\n{text.rstrip()}\n")
        return "".join(parts)


@functools.lru_cache(maxsize=1)
def shared_names() -> frozenset[str]:
    """Top-level names that two or more ditgraft modules define (``IMPLS``, ``DIRECTIONS``): the bundle always gives
    them their module's suffix, so every export names them alike. (diffusers imports every exported folder's module
    under one name, ``modeling_ditgraft``: two folders loaded in one process must agree on what each name means.)"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    seen: dict[str, int] = {}
    for folder, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for name in {n for node in tree.body for n in _bound_names(node)}:
                    seen[name] = seen.get(name, 0) + 1
    return frozenset(n for n, count in seen.items() if count > 1)


def _bound_in(fn: ast.AST) -> set[str]:
    """Names a function binds anywhere in its body (arguments, assignment / loop / with targets, nested defs,
    imports): a read of one of them inside the function is not a global read."""
    out = set()
    for sub in ast.walk(fn):
        if isinstance(sub, ast.arg):
            out.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            out.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and sub is not fn:
            out.add(sub.name)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            out.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            out.add(sub.name)
    return out


def _global_reads(node: ast.AST) -> list[ast.Name]:
    """The ``Name`` reads in ``node`` that refer to module globals: not bound in an enclosing function, and not in an
    annotation (the modules use ``from __future__ import annotations``, so annotations are never evaluated)."""
    out: list[ast.Name] = []

    def visit(n: ast.AST, local: frozenset) -> None:
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load) and n.id not in local:
                out.append(n)
            return
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = n.args
            for d in [*getattr(n, "decorator_list", []), *args.defaults, *[d for d in args.kw_defaults if d]]:
                visit(d, local)
            inner = local | _bound_in(n)
            for child in (n.body if isinstance(n.body, list) else [n.body]):
                visit(child, inner)
            return
        if isinstance(n, ast.AnnAssign):
            for child in (n.target, n.value):
                if child is not None:
                    visit(child, local)
            return
        if isinstance(n, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            local = local | {t.id for g in n.generators for t in ast.walk(g.target) if isinstance(t, ast.Name)}
        for child in ast.iter_child_nodes(n):
            visit(child, local)

    visit(node, frozenset())
    return out


def bundle_source(roots, provided: dict[str, str] | None = None, header: str = "") -> tuple[str, dict]:
    """The self-contained module text for ``roots`` (ditgraft classes / functions) and {root: its name in the
    module}. ``provided`` replaces library bindings by module-qualified name (``"ditgraft.x.NAME": "NAME = ..."``)."""
    bundle = Bundle(provided)
    names = {root: bundle.add(root) for root in roots}
    return bundle.source(header), names
