"""The repository's import graph (imports inside functions included): no cycles, no stage module
used as a library by another stage, and the direction pipeline -> stages -> data."""

from __future__ import annotations

import textwrap

from stages.code_version import import_graph
from tests.helpers import REPO


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_the_repository_has_no_import_cycle():
    assert cycles(import_graph(REPO)) == []


def test_a_stage_module_is_imported_only_by_its_own_package_and_the_registry():
    """`stages/<x>/stage.py` is a stage, not a library: what other stages share lives in modules
    named for their job (model files, scoring, settings)."""
    wrong = [
        f"{module} imports {imported}"
        for module, imports in import_graph(REPO).items()
        for imported in imports
        if imported.startswith("stages.")
        and imported.endswith(".stage")
        and module != "stages.registry"
        and not module.startswith(imported.rpartition(".")[0] + ".")
    ]
    assert wrong == []


def test_imports_go_pipeline_to_stages_to_data():
    layer = {"data": 0, "stages": 1, "pipeline": 2}
    wrong = [
        f"{module} imports {imported}"
        for module, imports in import_graph(REPO).items()
        for imported in imports
        if layer[imported.split(".")[0]] > layer[module.split(".")[0]]
    ]
    assert wrong == []


def write_modules(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """Known answer on a made-up repository: a cycle closed by an import inside a function, one
    by a relative import, and a module that is not in a cycle."""
    write_modules(
        tmp_path,
        {
            "data/__init__.py": "",
            "stages/__init__.py": "",
            "stages/a.py": "from stages.b import thing\n",
            "stages/b.py": "def thing():\n    from stages import a\n    return a\n",
            "pipeline/__init__.py": "",
            "pipeline/x.py": "from . import y\nimport data\n",
            "pipeline/y.py": "from .x import name\n",
            "pipeline/z.py": "import pipeline.x\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["stages.b"] == {"stages.a"} and graph["pipeline.x"] == {"pipeline.y", "data"}
    assert cycles(graph) == [["pipeline.x", "pipeline.y"], ["stages.a", "stages.b"]]


def test_every_module_imports_and_every_name_it_imports_exists(tmp_path):
    """A module that names something another module no longer has (a helper moved elsewhere)
    fails at import, in a subprocess so that nothing this suite imported hides it. Imports
    inside functions are checked too: each `from X import name` must find `name` in X."""
    import ast
    import importlib
    import subprocess
    import sys

    modules = sorted(import_graph(REPO))
    script = "import importlib\nfor name in %r:\n    importlib.import_module(name)\n" % modules
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    missing = []
    for name in modules:
        module = importlib.import_module(name)
        for node in ast.walk(ast.parse(open(module.__file__).read())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                source = importlib.import_module(node.module)
                missing += [
                    f"{name}: {node.module}.{a.name}"
                    for a in node.names
                    if not hasattr(source, a.name) and not _is_submodule(f"{node.module}.{a.name}")
                ]
    assert not missing, missing


def _is_submodule(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
