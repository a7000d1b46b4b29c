"""The package's layers, read from its source: no module imports a layer above its own, and the
modules import each other without a cycle (the README's architecture section draws the graph).

    engine   config, store, backups, validate, schemas, cache, maintenance, ...: no FUSE
    fs       the FUSE layer: request handlers, inodes, open files, the virtual views
    client   trees, control, events, and the Python API (cache, projects, tree): work from
             outside a daemon
    top      daemon (fs + client), cli, mount_helper, __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusestore"
CLIENT = {"fusestore.trees", "fusestore.control", "fusestore.events", "fusestore.cache", "fusestore.projects",
          "fusestore.tree"}
ALLOWED = {"engine": {"engine"}, "fs": {"engine", "fs"}, "client": {"engine", "client"},
           "top": {"engine", "fs", "client", "top"}}


def _layer(module: str) -> str:
    if module == "fusestore.engine" or module.startswith("fusestore.engine."):
        return "engine"
    if module == "fusestore.fs" or module.startswith("fusestore.fs."):
        return "fs"
    return "client" if module in CLIENT else "top"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every fusestore module `path` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        out |= {name for name in names if name in modules and name.startswith("fusestore.")}
    return out - {"fusestore"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    # `from fusestore.engine import store` names both the package and the module: keep the module.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
    return graph


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{src} ({_layer(src)}) imports {dst} ({_layer(dst)})"
              for src, targets in _graph().items() for dst in sorted(targets)
              if _layer(dst) not in ALLOWED[_layer(src)]]
    assert upward == []


def test_the_modules_import_each_other_without_a_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dst in sorted(graph.get(name, ())):
            if state.get(dst) == 1:
                cycles.append(" -> ".join(path[path.index(dst):] + [dst]))
            elif dst not in state:
                visit(dst, path + [dst])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_layer_checker_sees_an_upward_import(tmp_path):
    # The check itself can fail: an engine module importing the FUSE layer is caught.
    fake = tmp_path / "x.py"
    fake.write_text("from fusestore.fs import operations\nimport fusestore.engine.store\n")
    modules = {"fusestore.fs.operations": fake, "fusestore.engine.store": fake}
    found = _imports(fake, modules)
    assert found == {"fusestore.fs.operations", "fusestore.engine.store"}
    assert "fs" not in ALLOWED[_layer("fusestore.engine.store")]
