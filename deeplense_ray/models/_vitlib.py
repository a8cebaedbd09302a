"""The vit-pytorch architectures, from the copy vendored in ``deeplense_ray/models/_vendor/vit_pytorch``.

See that package's docstring for the version, the licence and why it is vendored instead of declared.
"""

from __future__ import annotations

import importlib
import types

_VENDORED = "deeplense_ray.models._vendor.vit_pytorch"


def import_vit_module(name: str) -> types.ModuleType:
    """Return the vendored ``vit_pytorch.<name>`` (e.g. ``"cvt"``, ``"vit_for_small_dataset"``)."""
    return importlib.import_module(f"{_VENDORED}.{name}")
