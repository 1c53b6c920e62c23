"""The subpackages are layers: a module imports only from layers below its own, and no two
modules import each other, even through a function-level import."""

import ast
from graphlib import CycleError, TopologicalSorter

from conftest import ROOT

PACKAGE = ROOT / "src/refusal_atlas"
# lower numbers are lower layers; a package may import from any layer strictly below, or itself
LAYERS = {
    "core": 0,
    "data": 1, "lm": 1, "reporting": 1, "cluster": 1,
    "saes": 2, "evaluation": 2, "steering": 2,
    "features": 3, "config": 3,
    "studies": 4,
    "pipeline": 5,
    "testing": 6,
}


def module_imports():
    """``{module: set of refusal_atlas modules it imports}``, at any depth of its code."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import; the layers are read from absolute ones")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("refusal_atlas"):
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("refusal_atlas")}
        out[name] = found
    modules = set(out)
    return {m: {i for i in deps if i in modules and i != m} for m, deps in out.items()}


def layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_every_subpackage_has_a_layer():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(LAYERS)


def test_no_import_points_up_or_across_a_layer():
    upward = []
    for module, deps in module_imports().items():
        here = layer(module)
        for dep in deps:
            there = layer(dep)
            if here and there and there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{module} -> {dep}")
    assert not upward, upward


def test_no_import_cycle():
    graph = {m: {d for d in deps if not PACKAGE.joinpath(*d.split(".")[1:], "__init__.py").exists()}
             for m, deps in module_imports().items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
