"""What library code a rule runs, as one hash its params carry, so that Snakemake's params
trigger reruns a rule exactly when the code behind it changes.

Snakemake's own code trigger sees only the thin script in ``workflow/scripts``; the logic lives
in this package. For a rule's script this finds the stage functions it calls
(``model.refusal_tune(...)`` of ``refusal_atlas.pipeline.model``), then, inside the stage module, every top-level definition those
functions reach by name, and every library module they import, with those modules' own imports
in turn. The hash covers the syntax tree of all of it without docstrings, so a comment, a blank
line, reformatting or a docstring edit reruns nothing, and any change to what the code does
reruns every rule that reaches it and no other.

Only the standard library is used: this runs while Snakemake builds the DAG.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE = "refusal_atlas"
SOURCE = Path(__file__).resolve().parents[1]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _path(module: str) -> Path | None:
    """The file of a library module named relative to the package (``pipeline.steering``)."""
    base = SOURCE.joinpath(*module.split(".")) if module else SOURCE
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    path = _path(module)
    if path is None:
        raise FileNotFoundError(f"{PACKAGE}.{module}: no such module under {SOURCE}")
    return _strip_docstrings(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))


@lru_cache(maxsize=None)
def _module_digest(module: str) -> str:
    return hashlib.sha256(ast.dump(_tree(module)).encode()).hexdigest()


def _from_base(n: ast.ImportFrom, importer: str) -> str | None:
    """The library module or package a ``from ... import`` reads from, relative to the package;
    None when it is not this package's."""
    if n.level == 0:
        base = n.module or ""
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            return None
        return base.removeprefix(PACKAGE).lstrip(".")
    parts = importer.split(".")[: -n.level] if importer else []
    return ".".join([*parts, *(n.module.split(".") if n.module else [])])


def _imports(node: ast.AST, importer: str) -> dict[str, tuple[str, str | None]]:
    """``{local name: (library module, name there or None for the module itself)}`` for every
    form of import of this package (``from refusal_atlas.x import y``, ``from .x import f``,
    ``import refusal_atlas.x``)."""
    out = {}
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom):
            base = _from_base(n, importer)
            if base is None:
                continue
            for alias in n.names:
                local = alias.asname or alias.name
                sub = f"{base}.{alias.name}" if base else alias.name
                out[local] = (sub, None) if _path(sub) is not None else (base, alias.name)
        elif isinstance(n, ast.Import):
            for alias in n.names:
                if alias.name.startswith(PACKAGE + "."):
                    out[alias.asname or alias.name] = (alias.name.removeprefix(PACKAGE + "."), None)
    return {k: v for k, v in out.items() if v[0] != importer or v[1] is not None}


def _imported_modules(node: ast.AST, importer: str) -> dict[str, str]:
    """``{local name: library module}`` for the package's modules that ``node`` imports."""
    return {local: module for local, (module, _) in _imports(node, importer).items() if module != importer}


@lru_cache(maxsize=None)
def module_closure(module: str) -> frozenset[str]:
    """``module`` and every library module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [d for d in _module_imports(m).values() if d not in seen]
    return frozenset(seen)


def _definitions(tree: ast.Module) -> dict[str, ast.stmt]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for name in ast.walk(t):
                    if isinstance(name, ast.Name):
                        out[name.id] = node
    return out


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


@lru_cache(maxsize=None)
def _module_imports(module: str) -> dict[str, str]:
    return _imported_modules(_tree(module), module)


@lru_cache(maxsize=None)
def _module_definitions(module: str) -> dict[str, ast.stmt]:
    return _definitions(_tree(module))


def function_dependencies(module: str, function: str) -> tuple[list[ast.stmt], set[str]]:
    """The top-level definitions of ``module`` that ``function`` reaches by name (itself
    included), and the library modules it reaches through them (transitive closure)."""
    defs = _module_definitions(module)
    if function not in defs:
        raise KeyError(f"{PACKAGE}.{module} has no top-level {function!r}")
    imports = _module_imports(module)
    reached, todo, modules = {}, [function], set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        node = defs[name]
        reached[name] = node
        for used in _names(node):
            if used in defs and used not in reached:
                todo.append(used)
            elif used in imports:
                modules |= module_closure(imports[used])
        modules |= {m for d in _imported_modules(node, module).values() for m in module_closure(d)}
    unique = list({id(n): n for n in reached.values()}.values())
    return sorted(unique, key=lambda n: n.lineno), modules - {module}


def script_calls(script: str | Path) -> list[tuple[str, str]]:
    """``(module, function)`` of each library call ``module.function(...)`` in a rule's script."""
    tree = ast.parse(Path(script).read_text(encoding="utf-8"))
    modules = _imported_modules(tree, "")
    calls = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name):
            if n.func.value.id in modules and n.func.attr != "logged":
                calls.append((modules[n.func.value.id], n.func.attr))
    if not calls:
        raise ValueError(f"{script}: calls no {PACKAGE} stage function")
    return sorted(set(calls))


def code_version(script: str | Path) -> str:
    """A short hash of the library code that ``script`` runs (see the module docstring)."""
    digest = hashlib.sha256()
    modules: set[str] = set()
    for module, function in script_calls(script):
        nodes, deps = function_dependencies(module, function)
        digest.update(f"{module}.{function}\n".encode())
        for node in nodes:
            digest.update(ast.dump(node).encode())
        modules |= deps
    for m in sorted(modules):
        digest.update(f"\n{m} {_module_digest(m)}".encode())
    return digest.hexdigest()[:16]


def _imported_names(node: ast.AST, importer: str) -> dict[str, tuple[str, str]]:
    """``{local name: (module, name there)}`` for names imported from a library module."""
    return {local: (m, name) for local, (m, name) in _imports(node, importer).items() if name is not None}


def _reach(start: list[tuple[str, str]]) -> list[tuple[tuple[str, str], ast.stmt]]:
    """Every top-level definition reached by name from ``start``, following calls across the
    package's modules (``f`` from ``from .x import f``, ``x.f`` from ``from . import x``)."""
    seen: dict[tuple[str, str], ast.stmt] = {}
    todo = list(start)
    while todo:
        module, name = todo.pop()
        defs = _module_definitions(module)
        if (module, name) in seen or name not in defs:
            continue
        node = defs[name]
        seen[(module, name)] = node
        modules = {**_module_imports(module), **_imported_modules(node, module)}
        names = {**_imported_names(_tree(module), module), **_imported_names(node, module)}
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                if n.id in defs:
                    todo.append((module, n.id))
                elif n.id in names:
                    todo.append(names[n.id])
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in modules \
                    and n.value.id not in names:
                todo.append((modules[n.value.id], n.attr))
    return list(seen.items())


def stage_reads(script: str | Path) -> set[str]:
    """Names the stage code behind ``script`` can read a config key by: string constants, keyword
    names, the parameters of the functions it reaches (``f(**cfg)``), and the fields of the
    dataclasses it builds. A params key outside this set is passed to
    the rule (and reruns it when edited) but never read."""
    out = {n.value for n in ast.walk(ast.parse(Path(script).read_text(encoding="utf-8")))
           if isinstance(n, ast.Constant) and isinstance(n.value, str)}  # the script's own reads
    for _, node in _reach(script_calls(script)):
        for n in ast.walk(node):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                out.add(n.value)
            elif isinstance(n, ast.keyword) and n.arg:
                out.add(n.arg)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):  # reached through f(**cfg)
            a = node.args
            out |= {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
        if isinstance(node, ast.ClassDef):
            out |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return out
