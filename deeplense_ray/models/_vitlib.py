"""Import vit-pytorch submodules even where ``torchvision`` is missing.

``vit_pytorch/__init__.py`` imports ``vit_pytorch.dino``, which imports torchvision; the architectures used
here (vit, vit_for_small_dataset, cvt, cait, cct, twins_svt, levit, cross_vit, pit, t2t, crossformer) need
only torch and einops. When the package import fails for that reason, the package is registered as a bare
namespace (its ``__init__`` not executed) so that its submodules import normally.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def import_vit_module(name: str) -> types.ModuleType:
    """Return ``vit_pytorch.<name>``."""
    try:
        return importlib.import_module(f"vit_pytorch.{name}")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("torchvision"):
            raise
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None or spec.submodule_search_locations is None:  # pragma: no cover - vit-pytorch missing
        raise ModuleNotFoundError("vit-pytorch is not installed (pip install vit-pytorch)")
    pkg = types.ModuleType("vit_pytorch")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["vit_pytorch"] = pkg
    return importlib.import_module(f"vit_pytorch.{name}")
