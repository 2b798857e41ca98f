"""Networks: explicit imports fill the registry (no file-system scanning), ``build_network`` builds from YAML.

``type`` is a registered name (``EMT``), or a user's own class imported at run time: ``my_package.my_module:MyNet``
(importable module) or ``path/to/file.py:MyNet`` (a file, relative to the working directory). An arch without a
placement preset takes its quantizer placement from the YAML (``quant.placement``, every key).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
import torch.nn as nn

from condiquant.archs import bicubic_arch, edsr_arch, emt_arch, imdn_arch, swinir_arch  # noqa: F401 (registers)
from condiquant.archs.registry import ARCH_REGISTRY
from condiquant.config import ConfigError


def build_network(opt: Mapping[str, Any], where: str = "network_g") -> nn.Module:
    """Build ``{type: Name, **kwargs}``; unknown type or keyword -> ConfigError naming the key."""
    kwargs = dict(opt)
    name = kwargs.pop("type", None)
    cls = external_arch(name, where) if isinstance(name, str) and ":" in name else ARCH_REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"{where}.type: unknown arch {name!r} (known: {', '.join(sorted(ARCH_REGISTRY))}, or "
                          f"'package.module:Class' / 'path/file.py:Class')")
    params = inspect.signature(cls.__init__).parameters
    for key in kwargs:
        if key not in params:
            allowed = ", ".join(p for p in params if p != "self")
            raise ConfigError(f"{where}.{key}: unknown option for {name} (allowed: {allowed})")
    model = cls(**kwargs)
    if cls not in ARCH_REGISTRY.values():  # a user's arch: its '@' products become quantizable MatMul modules
        model = user_model(model)
    return model


def user_model(model: nn.Module) -> nn.Module:
    """``model`` with its matmul calls rewritten (torch.fx), or as it is, with a warning, if it does not trace."""
    from condiquant.archs.fx import rewrite_matmuls

    try:
        traced = rewrite_matmuls(model)
    except ConfigError as exc:
        logging.getLogger("condiquant").warning("%s", exc)
        return model
    for attr in ("input_range", "window_size"):  # a GraphModule keeps only what forward uses
        if hasattr(model, attr):
            setattr(traced, attr, getattr(model, attr))
    return traced


def external_arch(spec: str, where: str) -> type:
    """The class named by ``module:Class`` or ``file.py:Class``; any import problem is one ConfigError."""
    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"{where}.type: file not found: {path}")
            mod_name = f"condiquant_user_arch_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look their module up here
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module may fail in any way while importing
        raise ConfigError(f"{where}.type: cannot import {target!r} ({type(exc).__name__}: {exc})") from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{where}.type: {target!r} has no nn.Module class {attr!r}")
    return cls


def read_state_dict(path: Union[str, Path], param_key: str = "auto") -> Dict[str, torch.Tensor]:
    """Load a checkpoint's state dict: ``{'params': sd}`` / ``{'params_ema': sd}`` wrappers and a
    ``module.`` (DataParallel) prefix are undone."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found (run scripts/fetch_assets.py)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise ConfigError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from None
    if param_key == "auto":
        param_key = next((k for k in ("params_ema", "params") if k in ckpt), "")
    if param_key:
        if param_key not in ckpt:
            raise ConfigError(f"{path}: no key {param_key!r} in checkpoint (keys: {', '.join(list(ckpt)[:5])})")
        ckpt = ckpt[param_key]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in ckpt.items()}


def load_pretrained(model: nn.Module, path: Union[str, Path], param_key: str = "auto", strict: bool = True) -> None:
    """Load weights; a key or shape mismatch (another arch or scale) is one ConfigError naming the file."""
    sd = read_state_dict(path, param_key)
    own = model.state_dict()
    arch = type(model).__name__
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ConfigError(f"{path}: {k} has shape {tuple(v.shape)} but {arch} expects {tuple(own[k].shape)} "
                              f"(checkpoint of another scale or configuration?)")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ConfigError(f"{path}: keys do not match {arch}: {'; '.join(parts)} (checkpoint of another arch?)")
    model.load_state_dict(sd, strict=strict)
