"""Training-state files: atomic writes, and the options record that makes a resume with other options fail."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from condiquant.config import ConfigError, to_dict

# Keys that may change between a run and its resume: where to resume from, and how fast to run.
RESUME_FREE = ("path.resume_state", "num_threads", "device")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_state(path: Path) -> Dict[str, Any]:
    """A training state written by the loop; an unreadable file is a one-line error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG state
    except Exception as exc:  # truncated, not a torch file, ...
        raise ConfigError(f"{path}: not a readable training state ({type(exc).__name__}); delete it or start "
                          f"afresh without path.resume_state") from None


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def options_record(opts: Any) -> Dict[str, Any]:
    """The resolved options as a flat dict, minus the keys a resume may change."""
    flat = flatten(to_dict(opts))
    return {k: v for k, v in flat.items() if k not in RESUME_FREE}


def differing_keys(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))


def check_resume_options(old: Optional[Dict[str, Any]], new: Dict[str, Any], path: Path) -> None:
    if old is None:
        raise ConfigError(f"{path}: the state records no options (made by an older version); start afresh")
    keys = differing_keys(old, new)
    if keys:
        shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ConfigError(f"{path}: made with other options ({shown}); resume with the same options or start "
                          f"afresh without path.resume_state")
