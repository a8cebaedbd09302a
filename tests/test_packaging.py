"""A plain `pip install .` gives working models: every third-party module the package imports comes from a
dependency pyproject.toml declares, the models build without vit-pytorch installed, and no declared dependency
pulls torchvision (which pins its own torch: a CUDA build on a CPU host). The dependency tree is read from the
installed packages' metadata; no fresh install (too slow for CI)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deeplense_ray"
#: Modules imported only where the code treats them as optional: triton (ships with CUDA torch builds; the
#: simulator falls back to eager torch), astropy (FITS input) and timm (``timm:<arch>`` models), the last two
#: with an error naming the install command.
OPTIONAL = {"triton", "astropy", "timm"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _imported_top_level() -> dict[str, str]:
    """Top-level module -> first file importing it, over every module of the package (lazy imports too)."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _closure(reqs: list[Requirement]) -> set[str]:
    """Normalised names of the declared requirements and everything they require (extras and markers
    evaluated as pip would here), from the installed metadata."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = _norm(req.name)
        if name in seen and not extras:
            continue
        seen.add(name)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return seen


def test_every_imported_module_comes_from_a_declared_dependency():
    provided = md.packages_distributions()
    allowed = _closure(_declared())
    stdlib = set(sys.stdlib_module_names)
    missing = {}
    for module, where in _imported_top_level().items():
        if module in stdlib or module == "deeplense_ray" or module in OPTIONAL:
            continue
        dists = {_norm(d) for d in provided.get(module, [])}
        if not dists & allowed:
            missing[module] = (where, sorted(dists) or "not installed")
    assert not missing, f"imported but not provided by a dependency in pyproject.toml: {missing}"


def test_no_declared_dependency_pulls_torchvision_or_vit_pytorch():
    closure = _closure(_declared())
    assert "torch" in closure and "einops" in closure  # the resolver sees the tree
    assert "torchvision" not in closure and "vit-pytorch" not in closure


def test_every_model_builds_without_vit_pytorch_installed():
    code = (
        "import sys\n"
        "sys.modules['vit_pytorch'] = None  # as after a plain install: importing it raises ImportError\n"
        "import torch\n"
        "from deeplense_ray.models import build_model, list_models\n"
        "for name in list_models():\n"
        "    out = build_model(name, 32, 1, 3, pixel_scale=0.1).eval()(torch.zeros(1, 1, 32, 32))\n"
        "    assert out.shape == (1, 3), (name, out.shape)\n"
        "print('OK', len(list_models()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-3000:]
    licence = PACKAGE / "models" / "_vendor" / "vit_pytorch" / "LICENSE"
    assert "Copyright (c) 2020 Phil Wang" in licence.read_text()
