"""The package's shape: no import cycles, and the CLI's cheap commands import no heavy library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "harness"
HEAVY = ("torch", "transformers", "peft", "pandas", "numpy", "scipy", "vllm", "bitsandbytes", "modelopt", "optuna", "ray",
         "wandb", "lm_eval")


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    """module -> the harness modules it imports, at module level or inside functions (a lazy import
    is still a dependency); imports under `if TYPE_CHECKING:` are annotations only and not counted."""
    modules = {_module_of(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node):
            if isinstance(node, ast.If) and _type_checking(node):
                return
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "harness")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "harness":
                    return
                for alias in node.names:  # `from harness.tuning import study` imports the module harness.tuning.study
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            for child in ast.iter_child_nodes(node):
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_harness_modules():
    graph = import_graph()
    assert "harness.cli.runs" in graph and "harness.api" in graph["harness.cli.runs"], "the graph reads the package"
    assert cycles(graph) == []


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def _imported(*argv: str) -> set[str]:
    """Top-level packages a fresh `python -m harness ARGV` imported (from -X importtime)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness", *argv], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    return {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["sweep", "smoke", "--dry-run"], ["matrices"],
                                  ["table", "--help"]])
def test_cheap_commands_import_no_heavy_library(argv):
    """`harness --help` answered in 0.24 s on the CI machine once torch (1 s) stayed out; the
    check is on what is imported, which decides that, not on a stopwatch."""
    imported = _imported(*argv)
    assert "harness" in imported and "typer" in imported
    assert sorted(imported & set(HEAVY)) == []
