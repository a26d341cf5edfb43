#!/usr/bin/env python
"""Check that autopetseg's imports only go down its layers.

Layers, lowest first; a module may import from its own group or from lower layers only:

    0  base          the package root's errors, io_utils, paths, options and __init__
    1  data, scoring (each only itself: same layer, other package is not allowed)
    2  planning
    3  preprocessing
    4  models
    5  training, inference (each only itself: they must not import each other)
    6  evaluation
    7  entry points  the package root's pipeline, demo, cli and __main__

Every ``autopetseg/**/*.py`` is parsed with ``ast`` (nothing is imported or run). Every import
counts, wherever it is written (module level, inside functions, under ``if TYPE_CHECKING:``):
``import autopetseg.x``, ``from autopetseg.x import y``, ``from autopetseg import x`` (x a
sub-package or module), relative imports (``from ..x import y``) and
``importlib.import_module("autopetseg.x")`` with a literal name. A module of the package that
belongs to no layer is reported too, so a new sub-package must be placed in ``LAYERS`` first.

Usage: ``python scripts/check_import_graph.py [PACKAGE_DIR]`` (default: the ``autopetseg``
folder beside this script's folder). Prints ``import graph OK (N modules)`` and exits 0, or
prints one line per violation, ``module -> imported (why)``, and exits 1.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# group -> (layer, members): a member is a sub-package or a module of the package root.
LAYERS: dict[str, tuple[int, tuple[str, ...]]] = {
    "base": (0, ("errors", "io_utils", "paths", "options", "__init__")),
    "data": (1, ("data",)),
    "scoring": (1, ("scoring",)),
    "planning": (2, ("planning",)),
    "preprocessing": (3, ("preprocessing",)),
    "models": (4, ("models",)),
    "training": (5, ("training",)),
    "inference": (5, ("inference",)),
    "evaluation": (6, ("evaluation",)),
    "entry points": (7, ("pipeline", "demo", "cli", "__main__")),
}
_GROUP_OF = {member: group for group, (_, members) in LAYERS.items() for member in members}

DEFAULT_PACKAGE = Path(__file__).resolve().parent.parent / "autopetseg"


@dataclass(frozen=True)
class Violation:
    module: str
    imported: str
    reason: str
    line: int

    def __str__(self) -> str:
        return f"{self.module} -> {self.imported} ({self.reason})"


def module_name(package_dir: Path, path: Path) -> str:
    """``autopetseg/data/loading.py`` -> ``autopetseg.data.loading``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    path = modules.get(module)
    return path is not None and path.name == "__init__.py"


def group_of(module: str, root: str) -> str | None:
    """The layer group of a module of package ``root`` (``None``: the module belongs to no layer)."""
    parts = module.split(".")
    if parts[0] != root:
        return None
    member = parts[1] if len(parts) > 1 else "__init__"
    return _GROUP_OF.get(member)


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str | None:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        if level - 1 > len(base):
            return None
        base = base[: len(base) - (level - 1)]
    if not base:
        return None
    return ".".join(base + ([name] if name else []))


def imports_of(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path], root: str) -> list[tuple[str, int]]:
    """(imported module of package ``root``, line) for every import in ``tree``."""
    found: list[tuple[str, int]] = []

    def add(target: str, line: int) -> None:
        if target == root or target.startswith(root + "."):
            found.append((target, line))

    def add_from(base: str, names: list[str], line: int) -> None:
        # ``from pkg import x``: x is a submodule when pkg.x is a module of the package, else a name in pkg.
        for name in names:
            sub = f"{base}.{name}"
            add(sub if name != "*" and sub in modules else base, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
                if base is None:
                    continue
            else:
                base = node.module or ""
            add_from(base, [alias.name for alias in node.names], node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            value = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(value, str):
                add(value, node.lineno)
    return found


def check(package_dir: str | Path = DEFAULT_PACKAGE) -> tuple[list[Violation], int]:
    """(violations, number of modules checked) for the package in ``package_dir``."""
    package_dir = Path(package_dir).resolve()
    root = package_dir.name
    modules = {module_name(package_dir, p): p for p in sorted(package_dir.rglob("*.py"))}
    violations: list[Violation] = []
    for module, path in modules.items():
        group = group_of(module, root)
        if group is None:
            violations.append(Violation(module, module, "belongs to no layer: add it to LAYERS", 0))
            continue
        layer = LAYERS[group][0]
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            violations.append(Violation(module, module, f"cannot be parsed: {exc.msg} (line {exc.lineno})", 0))
            continue
        seen: set[str] = set()
        for imported, line in imports_of(tree, module, _is_package(module, modules), modules, root):
            if imported in seen:
                continue
            seen.add(imported)
            other = group_of(imported, root)
            if other is None:
                violations.append(Violation(module, imported, "imports a module that belongs to no layer", line))
                continue
            if other == group:
                continue
            other_layer = LAYERS[other][0]
            if other_layer > layer:
                reason = f"layer {other_layer} {other} above layer {layer} {group}"
            elif other_layer == layer:
                reason = f"layer {other_layer} {other} beside layer {layer} {group}: same layer, other package"
            else:
                continue
            violations.append(Violation(module, imported, reason, line))
    return violations, len(modules)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    violations, n_modules = check(args[0] if args else DEFAULT_PACKAGE)
    if not violations:
        print(f"import graph OK ({n_modules} modules)")
        return 0
    for violation in violations:
        print(violation)
    print(f"{len(violations)} import graph violation(s) in {n_modules} modules", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
