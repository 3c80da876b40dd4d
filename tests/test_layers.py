"""The layers hold (#16): no import cycles, an engine without ML code at import, stages that never import each other.

The import graph is read with `ast` from the source of pipeline/, stages/ and bench/, so it sees every import
statement, wherever it is: at module level, inside a function (a lazy import is still a dependency), under
`if TYPE_CHECKING:` (a type-only dependency still couples the two modules). Nothing is imported to build it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
ML_LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "compressed_tensors",
    "llmcompressor",
    "datasets",
    "trl",
    "peft",
    "torchao",
    "deepspeed",
    "numpy",
)


@dataclass(frozen=True)
class Import:
    target: str  # the imported module, absolute ("pipeline.data.spec", "torch.nn")
    line: int
    module_level: bool  # executed when the importing module is imported (not in a function, not type-only)
    function: str | None = None  # the top-level function (or class) whose body holds the import


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(*tops: str) -> dict[str, Path]:
    return {module_name(p): p for top in tops for p in sorted((ROOT / top).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, name: str, known: set[str]) -> list[Import]:
    """Every import statement of the module at `path`, resolved to the deepest known module it names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def resolve(base: str, alias: str | None) -> str:
        # `from pipeline.data import spec` imports the module pipeline.data.spec; `from x import name` imports x
        if alias is not None and f"{base}.{alias}" in known:
            return f"{base}.{alias}"
        return base

    def visit(node: ast.AST, module_level: bool, function: str | None = None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, module_level, function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.extend(Import(resolve(base, a.name), child.lineno, module_level, function) for a in child.names)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, function or getattr(child, "name", None))
            elif isinstance(child, ast.ClassDef):
                visit(child, module_level, function or child.name)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), False, function)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), module_level, function)
            else:
                visit(child, module_level, function)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def graph(tops: tuple[str, ...] = PACKAGES) -> dict[str, list[Import]]:
    modules = source_modules(*tops)
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def internal_edges(g: dict[str, list[Import]]) -> dict[str, set[str]]:
    """module -> the modules of the graph it imports (anywhere in its source)."""
    return {m: {i.target for i in imps if i.target in g and i.target != m} for m, imps in g.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def _describe(component: list[str], edges: dict[str, set[str]]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(edges[m] & inside))}" for m in component)


def test_no_import_cycles():
    """No module reaches itself through imports, lazy and type-only ones included."""
    edges = internal_edges(graph())
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, edges) for c in found)


def _import_time_closure(start: str, g: dict[str, list[Import]]) -> dict[str, tuple[str, int]]:
    """Every module (ours or a library's) that importing `start` imports, with the module and line that does."""
    seen: dict[str, tuple[str, int]] = {}
    todo = [start]
    while todo:
        m = todo.pop()
        for imp in g[m]:
            if not imp.module_level:
                continue
            # importing pipeline.data.spec runs pipeline/data/__init__.py too: parents are edges of their own
            parts = imp.target.split(".")
            for k in range(1, len(parts) + 1):
                target = ".".join(parts[:k])
                if target not in seen:
                    seen[target] = (m, imp.line)
                    if target in g:
                        todo.append(target)
    return seen


# The recipe is made of these sections, so the engine's recipe.py imports their schemas (pydantic models, no ML
# library, checked below like the engine itself); everything else of the ML layers it imports in the function
# that needs it.
SCHEMAS = ("pipeline.data.spec", "pipeline.quant.scheme", "pipeline.model_spec")
REGISTRY = "stages"  # stages/__init__.py: the closed list of stage types, importlib only


def test_the_engine_imports_no_ml_code_at_import():
    """Importing any engine module loads no ML library, and imports of the other layers only their recipe schemas.

    The rule is on what runs at import (module level, followed transitively), not on lazy imports: the engine's
    job includes loading a stage module to read its Config, checking a recipe's model folder and seeding torch
    for a stage it runs, each in the function that does it. So `import pipeline.engine.runner` costs no torch,
    and `reasoning-qat status` or a plan runs without an ML library imported.
    """
    g = graph()
    problems = []
    for m in sorted(g):
        if not m.startswith("pipeline.engine"):
            continue
        for imp in g[m]:
            ours = imp.target.split(".")[0] in ("pipeline", "stages")
            allowed = (
                imp.target in SCHEMAS
                or imp.target == REGISTRY
                or imp.target == "pipeline"
                or imp.target.startswith("pipeline.engine")
            )
            if imp.module_level and ours and not allowed:
                problems.append(f"{m}:{imp.line} imports {imp.target} at module level")
        for target, (via, line) in sorted(_import_time_closure(m, g).items()):
            if target.split(".")[0] in ML_LIBRARIES:
                problems.append(f"{m} loads {target} at import ({via}:{line})")
    assert not problems, "\n".join(problems)


def test_stages_never_import_each_other():
    """Stages meet through artifacts only; the registry (stages/__init__.py) loads them by name."""
    g = graph()
    problems = [
        f"{m}:{i.line} imports {i.target}"
        for m, imps in g.items()
        if m.startswith("stages.")
        for i in imps
        if i.target.startswith("stages.") and i.target != m
    ]
    assert not problems, "\n".join(problems)


def test_bench_imports_no_stage():
    """The benchmarks measure library functions; what a stage and a benchmark share lives in pipeline/."""
    g = graph(("bench",))
    problems = [
        f"{m}:{i.line} imports {i.target}"
        for m, imps in g.items()
        for i in imps
        if i.target == "stages" or i.target.startswith("stages.")
    ]
    assert not problems, "\n".join(problems)


def test_the_graph_tool_sees_lazy_and_type_only_imports(tmp_path):
    """The reader itself: relative, lazy, type-only and `from package import module` imports are all edges."""
    src = (
        "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport torch\n"
        "from . import b\nif TYPE_CHECKING:\n    from pipeline.x import c\n"
        "def f():\n    from .b import thing\n    import numpy\n"
    )
    path = tmp_path / "a.py"
    path.write_text(src)
    found = imports_of(path, "pipeline.x.a", {"pipeline.x.a", "pipeline.x.b", "pipeline.x.c"})
    assert [(i.target, i.module_level) for i in found if i.target not in ("__future__", "typing")] == [
        ("torch", True),
        ("pipeline.x.b", True),
        ("pipeline.x.c", False),
        ("pipeline.x.b", False),
        ("numpy", False),
    ]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_the_engine_loads_no_ml_library():
    """The same rule, observed: a fresh interpreter that imports every engine module has no ML library loaded."""
    import subprocess
    import sys

    engine = sorted(m for m in source_modules("pipeline") if m.startswith("pipeline.engine."))
    code = (
        f"import sys\nfor m in {engine!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ML_LIBRARIES!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
