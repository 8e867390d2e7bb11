"""The layout's promises: no import cycle between project modules, small modules, light imports for the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "itermerge"
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports, anywhere in its body (function-level imports included,
    ``if TYPE_CHECKING:`` blocks excluded: they never run). ``from pkg import sub`` is an edge to the module
    ``pkg.sub`` when that is a module, else to ``pkg``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                         and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                         for child in node.body for n in ast.walk(child)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges |= subs or {node.module}
                if len(subs) < len(node.names):
                    edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_between_project_modules():
    graph = import_graph()
    assert "itermerge.pipeline" in graph and "itermerge.runner" in graph["itermerge.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_every_module_is_small_and_says_what_it_is_for():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        lines = text.count("\n")
        assert lines <= MAX_LINES, f"{path.relative_to(SRC)}: {lines} lines; split it by concern (at most {MAX_LINES})"
        assert ast.get_docstring(ast.parse(text)), (
            f"{path.relative_to(SRC)}: starts without a docstring saying its role"
        )


@pytest.mark.parametrize(
    "module",
    ["itermerge.config", "itermerge.cli", "itermerge.merging", "itermerge.search.selection", "itermerge.report"],
)
def test_light_modules_do_not_import_torch(module):
    """Parsing a config, `itermerge --help` and the merge command never pay torch's start-up."""
    code = f"import sys, {module}; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"import {module} loaded {done.stdout.strip()}"


def test_cli_help_does_not_import_torch():
    code = ("import sys\nfrom itermerge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


# The layers, bottom up: a package (or top-level module) imports only from layers below its own. Pure maths and the
# settings at the bottom, then checkpoints and models, the algorithm's stages, the search and studies, the pipeline,
# and the command line on top. A new module takes the lowest layer its imports allow.
LAYERS = [
    {"errors", "itermerge", "plots", "provenance", "seeds"},
    {"callables", "maths", "rundir"},
    {"across", "operators"},
    {"checkpoint", "config", "logprobs", "records"},
    {"devices", "integrity", "merging", "plan", "pruning", "tasks", "tokenization"},
    {"integrations", "labeling", "prompts", "runner", "sampling", "training"},
    {"evaluation", "iteration", "studies"},
    {"preflight", "search"},
    {"tables"},
    {"claims", "report"},
    {"pipeline"},
    {"replicates"},
    {"results"},
    {"commands"},
    {"cli"},
]


def package_of(module: str) -> str:
    """itermerge.search.points → search; itermerge.pipeline → pipeline; itermerge → itermerge."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Every import from a module to a package of its own layer or above (other than its own package)."""
    level = {name: i for i, layer in enumerate(layers) for name in layer}
    out = []
    for module, imports in sorted(graph.items()):
        a = package_of(module)
        for target in sorted(imports):
            b = package_of(target)
            if a == b:
                continue
            if a not in level or b not in level:
                out.append(f"{module} → {target}: {a if a not in level else b!r} has no layer in LAYERS")
            elif level[b] >= level[a]:
                out.append(f"{module} (layer {level[a]}) → {target} (layer {level[b]})")
    return out


def test_the_layer_check_sees_an_inversion():
    layers = [{"errors"}, {"config"}, {"sampling"}]
    planted = {"itermerge.config.run": {"itermerge.sampling.params"}, "itermerge.sampling.params": {"itermerge.errors"}}
    assert layer_violations(planted, layers) == ["itermerge.config.run (layer 1) → itermerge.sampling.params (layer 2)"]
    assert layer_violations({"itermerge.config.run": {"itermerge.errors"}}, layers) == []


def test_every_package_imports_only_from_the_layers_below_it():
    violations = layer_violations(import_graph(), LAYERS)
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)
