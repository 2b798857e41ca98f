"""Process-level setup shared by the entry points: device, threads, seeds, output folders, logging."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from condiquant.config import ConfigError


def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available (use 'auto' or 'cpu')")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc serve every tensor from its heap and keep freed memory there for the next one (no mmap, no trim),
    unless the environment sets CONDIQUANT_MALLOC=default. By default each block above 32 MiB is mapped fresh and
    unmapped when freed, so every forward pays a page fault per 4 KiB of its large activations: on EMT x4 (attention
    maps of 100+ MB) half of the CPU time went to the kernel (``scripts/bench_malloc.py``). Only where memory comes
    from changes, not a number; the heap keeps its peak size. False where it was not applied (no glibc mallopt)."""
    choice = os.environ.get("CONDIQUANT_MALLOC", "keep")
    if choice not in ("keep", "default"):
        raise ConfigError(f"CONDIQUANT_MALLOC: {choice!r}; expected keep or default")
    if choice == "default" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def configure(device: str, num_threads: int, seed: int = 0) -> torch.device:
    keep_freed_memory()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return select_device(device)


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def archive(path: Path) -> Optional[Path]:
    """Rename an existing ``path`` to ``<path>_archived_<time>`` (returned); nothing is ever overwritten."""
    if not path.exists():
        return None
    archived = path.with_name(f"{path.name}_archived_{timestamp()}")
    n = 1
    while archived.exists():  # two runs within one second
        archived, n = path.with_name(f"{path.name}_archived_{timestamp()}_{n}"), n + 1
    try:
        path.rename(archived)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot archive the previous run ({exc.strerror})") from None
    return archived


def fresh_dir(path: Path) -> Optional[Path]:
    """Create ``path``; an existing one is first archived (returned). An unwritable parent is a ConfigError."""
    archived = archive(path)
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the output folder ({exc.strerror})") from None
    return archived


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")


def setup_logger(log_file: Path) -> logging.Logger:
    """Log to the console and to ``log_file``; the file opens with the environment."""
    logger = logging.getLogger("condiquant")
    logger.setLevel(logging.INFO)
    # Replace the previous run's handlers only (a grid run keeps its own table-wide log handler).
    for h in [h for h in logger.handlers if getattr(h, "per_run", False)]:
        logger.removeHandler(h)
        h.close()
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
        handler.setFormatter(LOG_FORMAT)
        handler.per_run = True
        logger.addHandler(handler)
    logger.propagate = False
    logger.info("python %s, torch %s, numpy %s, %s, %d threads", platform.python_version(), torch.__version__,
                np.__version__, platform.platform(), torch.get_num_threads())
    return logger
