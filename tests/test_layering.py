"""The library imports nothing above it: no module of `k2jax` or `pallas_kernels` imports
`train`, `serve`, `convert`, `plan` or `cli`, at the top of a file or inside a function, nor
names one of their modules in a string (as `importlib.import_module` would take it)."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("k2jax", "pallas_kernels")
ABOVE = ("train", "serve", "convert", "plan", "cli")
_MODULE_STRING = re.compile(rf"^({'|'.join(ABOVE)})(\.\w+)+$")


def _violations(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if _MODULE_STRING.match(node.value) else []
        found += [f"{path.relative_to(root)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in ABOVE]
    return found


@pytest.mark.parametrize("package", LIBRARY)
def test_the_library_imports_nothing_above_it(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    violations = [v for path in files for v in _violations(path)]
    assert not violations, "\n".join(violations)


def test_the_check_sees_each_kind_of_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import serve.engine\nfrom train import step\n"
                      "def f():\n    from convert.reader import HFCheckpoint\n"
                      "NAME = 'plan.report'\nTEXT = 'serve the model'\n")
    assert [v.split(": ")[1] for v in _violations(sample, tmp_path)] == [
        "serve.engine", "train", "convert.reader", "plan.report"]


# The one two-module cycle left, a lookup on use: `ModelConfig.preset` reads the table of
# `presets`, which builds `ModelConfig`s.
KNOWN_CYCLES = {("k2jax.config", "k2jax.presets")}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the `k2jax` and `pallas_kernels` modules it imports anywhere in its file
    (packages excluded)."""
    graph = {}
    for path in [*(REPO / "k2jax").rglob("*.py"), *(REPO / "pallas_kernels").rglob("*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps.update(n for n in names if n.startswith(("k2jax.", "pallas_kernels."))
                        and (REPO / Path(*n.split("."))).with_suffix(".py").is_file())
        graph[module] = deps - {module}
    return graph


def test_no_import_cycles_within_k2jax_and_the_kernels():
    graph = _import_graph()
    assert {"k2jax.model", "k2jax.moe", "pallas_kernels.grouped_matmul.api"} <= graph.keys()
    cycles = set()

    def visit(module, path):
        for dep in graph.get(module, ()):
            if dep in path:
                cycles.add(tuple(sorted(path[path.index(dep):])))
            else:
                visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
    assert cycles == KNOWN_CYCLES, sorted(cycles - KNOWN_CYCLES)
