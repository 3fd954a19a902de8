"""The one-way imports of docs/ARCHITECTURE.md: ``pretrain`` never imports ``transfer``, ``tools``
or ``experiments``, and ``transfer`` never imports ``tools`` or ``experiments``; read off the
source with ``ast`` (imports at module level and inside functions, and ``importlib.import_module``
/ ``__import__`` of a literal name), so a lazy import breaks it as much as a top-level one."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {
    "pretrain": ("transfer", "tools", "experiments"),
    "transfer": ("tools", "experiments"),
}


def imported_modules(source: str, filename: str = "<source>"):
    """``(line, module)`` of every import in ``source``, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    found.append((node.lineno, first.value))
    return found


def violations(package: str):
    """``path:line imports module`` for each import of a package ``package`` must not use."""
    bad = []
    for folder, _dirs, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            for line, module in imported_modules(source, path):
                if module.split(".")[0] in FORBIDDEN[package]:
                    bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    assert violations(package) == []


def test_the_check_sees_lazy_and_dynamic_imports():
    source = (
        "import os\n"
        "def f():\n"
        "    from transfer.convert import convert\n"
        "    import tools.sweep\n"
        "    return importlib.import_module('experiments.k_sweep')\n"
        "from . import sibling\n"
    )
    modules = [m for _, m in imported_modules(source)]
    assert modules == ["os", "transfer.convert", "tools.sweep", "experiments.k_sweep"]
