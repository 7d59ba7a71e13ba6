"""The shape of the code, checked: no import cycle inside the package, only the runner runs
layers, and the command line stays a thin layer of small files."""

from __future__ import annotations

import ast
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
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of this package that ``path`` imports (anywhere in the file, lazy imports
    included; ``if TYPE_CHECKING`` blocks excluded: they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    found.add(sub)
                elif node.module in known:
                    found.add(node.module)
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


def test_no_import_cycle_inside_the_package() -> None:
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


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
    "models",
    "accounting",
    "policies",
    "runtime",
    "text",
    "scoring",
    "eval",
    "lm_eval_tasks",
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
    known = modules()
    graph = {name: imports_of(path, known) - {name} for name, path in known.items()}
    assert upward_imports(graph) == []


def test_the_layer_check_finds_upward_imports() -> None:
    graph = {"quicksilver.runtime.engine": {"quicksilver.api.llm", "quicksilver.models.config"}}
    assert upward_imports(graph) == ["quicksilver.runtime.engine -> quicksilver.api.llm"]


def test_no_source_file_is_over_500_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 500} == {}
