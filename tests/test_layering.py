"""The package's import graph: layers point down and no module imports itself through others.

Every import of ``deeplense_ray`` modules counts, at module level or inside a function (a deferred import is
still a dependency); only imports under ``if TYPE_CHECKING:`` are left out (they never run). Layers, lowest
first: small leaf modules anyone may import (io, npyio, ranking, runtime, sizes, cli, yamlio), then
sim -> data -> models -> tracking -> train (with config, the training options) -> tune / study / infer.
The jobs/ scripts sit above the package and are not part of it.

What is not there yet is listed below (``KNOWN_UPWARD``, ``KNOWN_CYCLE_EDGES``: the training core's one
remaining cycle, through config, train, tracking.models and infer.model). The tests fail on any upward import
or cycle edge not in those lists, and on a listed one that no longer exists, so the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "deeplense_ray"

#: layer of each top-level part of the package; a module may import only its own layer or lower ones
LAYERS = {
    "deeplense_ray": 0,  # the package's __init__
    "io": 0, "npyio": 0, "ranking": 0, "runtime": 0, "sizes": 0, "cli": 0, "yamlio": 0,
    "sim": 1,
    "data": 2,
    "models": 3,
    "tracking": 4,
    "train": 5, "config": 5,
    "tune": 6, "study": 6, "infer": 6,
}  # fmt: skip


#: upward imports still to remove (importer, imported), without the ``deeplense_ray.`` prefix
KNOWN_UPWARD = {("tracking.models", "train.checkpoint"), ("tracking.models", "infer.model")}
#: import edges inside the one remaining cycle (importer, imported)
KNOWN_CYCLE_EDGES = {
    ("config", "train.online"), ("config", "train.regression"), ("config", "train.targets"),
    ("infer.model", "tracking.models"), ("infer.model", "train.checkpoint"),
    ("tracking.models", "infer.model"), ("tracking.models", "train.checkpoint"),
    ("train.checkpoint", "train.modules"), ("train.modules", "train.targets"),
    ("train.online", "tracking.models"), ("train.online", "train.checkpoint"),
    ("train.online", "train.regression"), ("train.online", "train.targets"),
    ("train.regression", "config"), ("train.regression", "train.checkpoint"),
    ("train.regression", "train.online"), ("train.regression", "train.targets"), ("train.targets", "config"),
}  # fmt: skip


def _short(module: str) -> str:
    return module.removeprefix("deeplense_ray.")


def module_files() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules ``name`` imports (-> the line of the first such import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        if target in modules and target != name:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "deeplense_ray":
                    add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "deeplense_ray":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                add(sub if sub in modules else mod, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else parts[0]
    assert key in LAYERS, f"{module}: no layer assigned (add its top-level part to LAYERS)"
    return LAYERS[key]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = {
        (_short(src), _short(dst)): line
        for src, deps in graph.items()
        for dst, line in deps.items()
        if layer(dst) > layer(src)
    }
    new = [f"{a}:{line} imports {b}" for (a, b), line in sorted(upward.items()) if (a, b) not in KNOWN_UPWARD]
    assert not new, "upward imports (a module may import only its own layer or lower ones):\n" + "\n".join(
        new
    )
    gone = sorted(KNOWN_UPWARD - set(upward))
    assert not gone, f"no longer upward: remove {gone} from KNOWN_UPWARD"


def test_no_import_cycles():
    graph = import_graph()
    edges = set()
    detail = []
    for comp in cycles(graph):
        members = set(comp)
        comp_edges = {
            (_short(a), _short(b)): line for a in comp for b, line in graph[a].items() if b in members
        }
        edges |= set(comp_edges)
        new = [
            f"  {a}:{line} -> {b}"
            for (a, b), line in sorted(comp_edges.items())
            if (a, b) not in KNOWN_CYCLE_EDGES
        ]
        if new:
            detail.append(
                f"cycle of {len(comp)}: {', '.join(map(_short, comp))}; new edges:\n" + "\n".join(new)
            )
    assert not detail, "\n".join(detail)
    gone = sorted(KNOWN_CYCLE_EDGES - edges)
    assert not gone, f"no longer in a cycle: remove {gone} from KNOWN_CYCLE_EDGES"


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The rules bite: a two-module cycle and a sim -> train import in a synthetic package are reported."""
    graph = {
        "deeplense_ray.sim.a": {"deeplense_ray.train.b": 3},
        "deeplense_ray.train.b": {"deeplense_ray.sim.a": 5},
        "deeplense_ray.io": {},
    }
    assert cycles(graph) == [["deeplense_ray.sim.a", "deeplense_ray.train.b"]]
    assert layer("deeplense_ray.sim.a") < layer("deeplense_ray.train.b")
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deeplense_ray.train import loop\n"
        "def g():\n    from deeplense_ray.sim import presets\n"
    )
    mods = {"deeplense_ray.x": f, "deeplense_ray.sim.presets": f, "deeplense_ray.train.loop": f}
    assert imports_of("deeplense_ray.x", f, mods) == {"deeplense_ray.sim.presets": 5}
