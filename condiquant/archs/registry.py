"""Name -> class table for networks, filled by explicit imports in ``condiquant.archs``.

No import-time scanning of the file system: an arch exists when its module is imported in ``archs/__init__.py``.
"""
from __future__ import annotations

from typing import Dict, Type

import torch.nn as nn

ARCH_REGISTRY: Dict[str, Type[nn.Module]] = {}


def register_arch(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Class decorator: make ``cls`` buildable as ``network_g: {type: <cls.__name__>}``."""
    name = cls.__name__
    if name in ARCH_REGISTRY:
        raise KeyError(f"arch {name!r} registered twice")
    ARCH_REGISTRY[name] = cls
    return cls
