"""Quantized checkpoints: the FP state dict plus quantizer bounds, with what is needed to rebuild the model.

Format: ``{'params': state_dict, 'network_g': {...}, 'quant': {...resolved QuantOptions...}}``. The ``params``
wrapper keeps BasicSR's habit; ``test.py`` recognises the ``quant`` entry and rebuilds the quantized network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from condiquant.archs import build_network
from condiquant.config import ConfigError, from_dict, to_dict
from condiquant.options import QuantOptions
from condiquant.quant.adaround import baked_copy
from condiquant.quant.attach import attach_quantizers
from condiquant.transforms.rotation import restore_rotations


def save_quantized(path: Path, model: nn.Module, network_g: Dict[str, Any], quant: QuantOptions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    model = baked_copy(model)  # learned rounding is stored as the rounded weights
    torch.save({"params": model.state_dict(), "network_g": dict(network_g), "quant": to_dict(quant)}, tmp)
    tmp.replace(path)


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or not a torch file
        raise ConfigError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None


def quant_options_of(path: Path) -> Optional[QuantOptions]:
    """The checkpoint's quantization options, or None for a float checkpoint."""
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or "quant" not in ckpt:
        return None
    return from_dict(QuantOptions, ckpt["quant"], f"{path}: quant")


def build_quantized(path: Path, network_g: Dict[str, Any], where: str) -> nn.Module:
    """Rebuild the quantized model stored at ``path``; ``network_g`` (from the test YAML) must match it."""
    ckpt = _load(path)
    if dict(ckpt["network_g"]) != dict(network_g):
        raise ConfigError(f"{where} network_g: differs from the quantized checkpoint {path} "
                          f"({ckpt['network_g']})")
    model = build_network(network_g, f"{where} network_g")
    restore_rotations(model, ckpt["params"])
    attach_quantizers(model, from_dict(QuantOptions, ckpt["quant"], f"{path}: quant"))
    missing, unexpected = model.load_state_dict(ckpt["params"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: keys do not match the quantized {network_g['type']} "
                          f"(missing {missing[:1]}, unexpected {unexpected[:1]})")
    return model
