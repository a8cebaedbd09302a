"""YAML as the configuration files and command lines here read it (a leaf module: anyone may import it)."""

from __future__ import annotations

import re
from typing import Any


def yaml_load(text: str) -> Any:
    """YAML as PyYAML's safe loader reads it, except that 1e-1 and 3E5 are floats (YAML 1.1, which PyYAML
    follows, wants a dot, 1.0e-1, and reads 1e-1 as a string). Raises yaml.YAMLError."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass
