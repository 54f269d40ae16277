"""Code versions: a hash of the code a stage's results depend on, part of its cache key.

A stage's code is the import closure of its module(s) within this repository (`pipeline/`,
`stages/`, `data/`): the modules they import, at module level or inside a function, the
modules those import, and so on, with the packages that hold them. Each module counts by its
syntax tree without docstrings, so comments, docstrings and formatting never make a stage
stale, and code does. The same walk gives the repository's import graph
(tests/test_imports.py checks it for cycles and for the direction pipeline -> stages -> data).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "data")


@dataclass(frozen=True)
class ModuleCode:
    imports: frozenset[str]  # the repository's modules it imports (not its own packages)
    digest: str  # of its syntax tree without docstrings


_parsed: dict[tuple[Path, int, int], ModuleCode] = {}  # by (path, mtime, size): parsed once a process


def repository_modules(root: Path | None = None) -> dict[str, Path]:
    """{dotted module name: file} of every module under the packages of `root` (default: this
    repository); a package is its __init__."""
    root = root or SOURCE_ROOT
    modules = {}
    for package in PACKAGES:
        for path in sorted((Path(root) / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The repository module an import of `name` loads (`stages.cam.infer.load_cam` ->
    `stages.cam.infer`); None outside the repository."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in `tree` names (inside functions too):
    `from a.b import c` names both `a.b` and `a.b.c`, which may be a module."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` levels above this one's
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def without_docstrings(tree: ast.AST) -> ast.AST:
    """`tree` with the docstring of its module, classes and functions removed."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:]
    return tree


def syntax_text(node) -> str:
    """A syntax tree as text, without positions, empty fields left out (so that Python versions
    that add fields, such as 3.12's `type_params`, write the same code the same way)."""
    if isinstance(node, ast.AST):
        fields = ", ".join(
            f"{name}={syntax_text(value)}"
            for name, value in ast.iter_fields(node)
            if not (value is None or (isinstance(value, list) and not value))
        )
        return f"{type(node).__name__}({fields})"
    if isinstance(node, list):
        return f"[{', '.join(syntax_text(item) for item in node)}]"
    return repr(node)


def module_code(name: str, path: Path, modules: dict[str, Path]) -> ModuleCode:
    stat = path.stat()
    stamp = (path, stat.st_mtime_ns, stat.st_size)
    if stamp not in _parsed:
        tree = ast.parse(path.read_bytes(), filename=str(path))
        imports = {resolve(imported, modules) for imported in imported_names(tree, name, path.name == "__init__.py")}
        imports = frozenset(m for m in imports if m is not None and m != name and not name.startswith(f"{m}."))
        digest = hashlib.sha256(syntax_text(without_docstrings(tree)).encode()).hexdigest()
        _parsed[stamp] = ModuleCode(imports, digest)
    return _parsed[stamp]


def import_graph(root: Path | None = None) -> dict[str, frozenset[str]]:
    """{module: the repository modules it imports} over the whole repository."""
    modules = repository_modules(root)
    return {name: module_code(name, path, modules).imports for name, path in modules.items()}


def packages_of(name: str) -> list[str]:
    """`stages.cam.infer` -> [`stages`, `stages.cam`]: the packages importing it runs first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_closure(entries: Iterable[str], root: Path | None = None, skip: Iterable[str] = ()) -> list[str]:
    """`entries` and every repository module they import, directly or not, with their packages,
    sorted; the walk does not enter the modules of `skip`."""
    modules, skip = repository_modules(root), set(skip)
    todo = list(entries)
    unknown = [name for name in todo if name not in modules]
    if unknown:
        raise ValueError(f"no module {unknown[0]!r} under {root or SOURCE_ROOT}")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        todo.extend(module_code(name, modules[name], modules).imports)
        todo.extend(package for package in packages_of(name) if package in modules)
    return sorted(seen)


def code_version(entries: Iterable[str], root: Path | None = None, skip: Iterable[str] = ()) -> str:
    """Hash of the code of the import closure of `entries` (16 hex digits)."""
    modules = repository_modules(root)
    digest = hashlib.sha256()
    for name in import_closure(entries, root, skip):
        digest.update(f"{name}\0{module_code(name, modules[name], modules).digest}\n".encode())
    return digest.hexdigest()[:16]
