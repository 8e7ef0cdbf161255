"""The code's layout rules, checked on the source: no module reaches into another's private names,
and every launcher names its target as an import, not a string."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mdt_jax", "launch", "benchmarks", "configs")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: pathlib.Path) -> list[str]:
    """`from project.mod import _x` and `mod._x` where `mod` names a project module imported here."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path)
    modules: dict[str, str] = {}  # local alias -> project module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for a in node.names:
                target = f"{node.module}.{a.name}"
                if _private(a.name) and node.module != own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
                modules[a.asname or a.name] = target
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    modules[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            chain = []
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                target = ".".join([modules[base.id], *reversed(chain)])
                if target != own:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {target}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [f for p in _sources() for f in private_uses(p)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checker_sees_a_private_import(tmp_path):
    bad = ROOT / "mdt_jax" / "_layout_probe_tmp.py"
    try:
        bad.write_text("from mdt_jax.merge import _x\nimport mdt_jax.run as R\nR._y\n")
        found = private_uses(bad)
    finally:
        bad.unlink()
    assert len(found) == 2, found


ADAPTERS = {"mdt_jax/run.py", "mdt_jax/reproduce.py"}  # the config-reading layer: run's adapters and the study


def test_only_the_adapters_read_configdicts():
    found = []
    for p in sorted((ROOT / "mdt_jax").rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] == "ml_collections" for n in names) and rel not in ADAPTERS:
                    found.append(f"{rel}:{node.lineno} imports ml_collections")
            if isinstance(node, ast.Attribute) and node.attr in ("unlocked", "copy_and_resolve_references"):
                found.append(f"{rel}:{node.lineno} .{node.attr}: configs are typed once, at the adapter")
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_from_config") and rel != "mdt_jax/run.py":
                found.append(f"{rel}:{node.lineno} defines {node.name}: adapters live in mdt_jax/run.py")
    assert not found, "\n".join(found)


def test_launchers_import_their_target():
    for p in sorted((ROOT / "launch").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "config_app":
                target = node.args[1]
                assert isinstance(target, ast.Name), f"{p.name}: config_app's target must be an imported function"


def test_no_module_defines_a_top_level_name_twice():
    found = []
    for p in _sources():
        seen = {}
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                if node.name in seen:
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno} redefines {node.name} (line {seen[node.name]})")
                seen[node.name] = node.lineno
    assert not found, "\n".join(found)
