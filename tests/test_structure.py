"""The shape of the code, checked: no import cycle between any two modules, only the runner
runs layers, the command line stays a thin layer of small files, and no function outgrows a
screen."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quicksilver"
RUNNER = PACKAGE / "runtime" / "engine.py"
# The compiled dense step: the runner's one-token step traced into a graph, called only by it.
COMPILED_STEP = PACKAGE / "runtime" / "compiled.py"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside the body of an ``if TYPE_CHECKING:`` block, which never runs (its ``else``
    does, and so does the body of ``if not TYPE_CHECKING:``)."""
    while node in parents:
        parent = parents[node]
        if (
            isinstance(parent, ast.If)
            and ast.unparse(parent.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            and node in parent.body
        ):
            return True
        node = parent
    return False


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str | None:
    """The module a ``from ... import`` names, relative ones (``from . import x``) resolved
    against the importing module."""
    if node.level == 0:
        return node.module
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of this package that ``path`` imports (anywhere in the file: module level and
    lazy imports inside functions alike, since either closes a circle when it runs;
    ``if TYPE_CHECKING`` blocks excluded: they never run). Importing ``a.b.c`` also runs the
    ``a`` and ``a.b`` packages, but a package's ``__init__`` is already being imported
    whenever one of its own modules is, so those edges are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    importer = module_name(path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif module in known:
                    found.add(module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the import graph, as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The graph's strongly connected components (Tarjan's algorithm): modules that all reach
    each other, so every component of two or more modules holds at least one import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each knot of modules that import each other, so a failure names every
    circle at once rather than the first one met."""
    cycles = []
    for component in strongly_connected(graph):
        inside = {node: graph.get(node, set()) & component for node in component}
        cycle = find_cycle(inside)
        if cycle:
            cycles.append(cycle)
    return sorted(cycles)


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_no_import_cycle_between_any_two_modules() -> None:
    """Inside a package (``runtime.a`` <-> ``runtime.b``) as well as across packages: a
    circle works only while every import in it happens to run in a lucky order."""
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    knots = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert find_cycles(knots) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_and_relative_imports_count_and_type_checking_ones_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "quicksilver" / "runtime" / "batch.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from quicksilver.api import llm\n"
        "else:\n"
        "    from quicksilver.models import config\n"
        "from . import cache\n"
        "from ..policies.base import Policy\n"
        "def later():\n"
        "    import quicksilver.runtime.engine\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = [
        "quicksilver.api.llm",
        "quicksilver.models.config",
        "quicksilver.runtime.cache",
        "quicksilver.policies.base",
        "quicksilver.runtime.engine",
    ]
    known = {name: Path() for name in names}
    assert imports_of(source, known) == set(names) - {"quicksilver.api.llm"}


def _runs_a_block(node: ast.AST) -> bool:
    """A call of a transformer block: ``block(...)`` or ``model.blocks[i](...)``."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Name):
        return func.id == "block"
    return isinstance(func, ast.Subscript) and ast.unparse(func.value).endswith("blocks")


@pytest.mark.parametrize(
    "path",
    sorted(p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_the_runner_runs_layers(path: Path) -> None:
    if path in (RUNNER, COMPILED_STEP):
        return
    tree = ast.parse(path.read_text(encoding="utf-8"))
    calls = [ast.unparse(n) for n in ast.walk(tree) if _runs_a_block(n)]
    assert not calls, f"{path.name} runs layers itself ({calls[0]}); go through Engine.forward"


def test_the_runner_does_run_layers() -> None:
    for path in (RUNNER, COMPILED_STEP):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(_runs_a_block(n) for n in ast.walk(tree)), path.name


def test_only_the_runner_calls_the_compiled_step() -> None:
    users = [
        p.name
        for p in PACKAGE.rglob("*.py")
        if p not in (RUNNER, COMPILED_STEP) and "CompiledDecode" in p.read_text(encoding="utf-8")
    ]
    assert not users, users


def test_command_line_files_stay_small() -> None:
    cli = PACKAGE / "cli"
    files = sorted(cli.glob("*.py")) if cli.is_dir() else [PACKAGE / "cli.py"]
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert max(sizes.values()) <= 500, sizes


# Packages from the bottom up: each may import only those before it (and itself). The
# package root (``quicksilver/__init__``, the public API's names) sits with ``api``.
LAYERS = [
    "errors",
    "outputs",
    "quant",
    "kernels",
    "models",
    "accounting",
    "policies",
    "runtime",
    "text",
    "scoring",
    "eval",
    "lm_eval_tasks",
    "adapt",
    "api",
    "integrations",
    "bench",
    "serve",
    "cli",
]


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return LAYERS.index("api")
    if parts[1] == "__main__":
        return LAYERS.index("cli")
    return LAYERS.index(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if _layer(b) > _layer(a))


def test_packages_import_only_downwards() -> None:
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_upward_imports() -> None:
    graph = {"quicksilver.runtime.engine": {"quicksilver.api.llm", "quicksilver.models.config"}}
    assert upward_imports(graph) == ["quicksilver.runtime.engine -> quicksilver.api.llm"]


def test_no_source_file_is_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}


MAX_FUNCTION_LINES = 80
# Where length is a list of options rather than logic: argparse parser builders (named
# ``add_parser*`` / ``build_parser*``, or anything in the CLI's shared options module).
PARSER_BUILDER_PREFIXES = ("add_parser", "build_parser")
OPTIONS_MODULE = PACKAGE / "cli" / "options.py"


def _is_data(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Schema data: after its docstring, only assignments and a return (no branch, loop or
    nested function), so its length is the size of a literal, not of an algorithm."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return all(isinstance(s, (ast.Assign, ast.AnnAssign, ast.Return)) for s in body)


def _exempt(path: Path, function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return (
        path == OPTIONS_MODULE
        or function.name.startswith(PARSER_BUILDER_PREFIXES)
        or _is_data(function)
    )


def long_functions(path: Path, label: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (n lines)`` for each function or method in ``path`` longer than
    ``limit`` lines, from its ``def`` to its last line (nested functions count towards the
    one that holds them, and are checked on their own too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit and not _exempt(path, node):
                found.append(f"{label}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_over_80_lines() -> None:
    """A function that does not fit on a screen does several things; name them."""
    offenders = [
        offender
        for path in sorted(PACKAGE.rglob("*.py"))
        for offender in long_functions(path, str(path.relative_to(ROOT)))
    ]
    assert offenders == [], "functions over 80 lines:\n" + "\n".join(offenders)


def test_the_length_check_finds_long_functions(tmp_path: Path) -> None:
    loop = "    for step in range(3):\n        total += step\n"
    source = tmp_path / "long.py"
    source.write_text(
        "def long_one(total):\n" + loop * 40 + "    return total\n\n\n"
        "def add_parser_run(parser):\n" + loop * 40 + "\n\n"
        "def schema(size):\n" + "    table = {}\n" * 90 + "    return table\n",
        encoding="utf-8",
    )
    assert long_functions(source, "long.py") == ["long.py:1 long_one (82 lines)"]


# Other projects' private names we call on purpose (torch's weight-only kernels, argparse's
# sub-parser type): what this check guards is our modules' boundaries.
FOREIGN_ROOTS = {"torch", "argparse"}


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, assigned names and attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if name.startswith("_")}


def private_reach_ins(path: Path, label: str) -> list[str]:
    """``x._name`` (x not self or cls) or ``from m import _name`` where ``_name`` is not
    defined in this module: reaching into another module's private parts."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = _defined_private_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{label}:{node.lineno} imports {node.module}.{alias.name}")
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") or node.attr in own:
            continue
        if _root_name(node.value) in {"self", "cls", *FOREIGN_ROOTS}:
            continue
        found.append(f"{label}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    found = [
        reach for name, path in sorted(modules().items()) for reach in private_reach_ins(path, name)
    ]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_finds_reach_ins(tmp_path: Path) -> None:
    source = tmp_path / "reach.py"
    source.write_text(
        "from other import _hidden\n"
        "class Mine:\n"
        "    def __init__(self):\n"
        "        self._own = 1\n"
        "    def peek(self, llm, twin):\n"
        "        return llm._lock, twin._own, self._own, torch.ops.aten._int4\n"
    )
    found = private_reach_ins(source, "reach")
    assert found == ["reach:1 imports other._hidden", "reach:6 llm._lock"]
