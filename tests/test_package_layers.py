"""The package's layers (docs/layout.md): every import inside vae/ points down or sideways, never up, and the
modules' top-level imports form no cycle. A newcomer can then read the package bottom-up, and a concern can be
lifted out without dragging the loop along."""

import ast
from pathlib import Path

from .conftest import REPO

# Lowest first. A module may import its own layer (no cycle) and the layers below it.
LAYERS = [
    ("basics", ("vae", "vae.config", "vae.errors", "vae.console", "vae.storage.files", "vae.cluster.exit_records",
                "vae.cluster.rank_logs")),
    ("storage", ("vae.storage",)),
    ("data and models", ("vae.datasets", "vae.models")),
    ("figures", ("vae.figures",)),
    ("trackers", ("vae.tracking",)),
    ("cluster", ("vae.cluster",)),
    ("evaluation", ("vae.evaluation",)),
    ("training", ("vae.training",)),
    ("commands", ("vae.report", "vae.cluster.launcher")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (REPO / "vae").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    """The layer of the longest prefix that names `module` or a package holding it."""
    matches = [(len(p), index) for index, (_, prefixes) in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    assert matches, f"{module} belongs to no layer: add it to LAYERS and docs/layout.md"
    return max(matches)[1]


def _imports(module: str, top_level_only: bool) -> set[str]:
    """The vae modules `module` imports (relative imports resolved; `from pkg import submodule` as the submodule)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module}


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    upward = []
    for module in MODULES:
        for imported in _imports(module, top_level_only=False):
            if _layer(imported) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {imported} "
                              f"({LAYERS[_layer(imported)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {module: _imports(module, top_level_only=True) for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            # a package's __init__ importing its own submodules is not a cycle of concerns
            if imported.startswith(module + "."):
                continue
            assert state.get(imported) != "open", " -> ".join([*path, module, imported])
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
