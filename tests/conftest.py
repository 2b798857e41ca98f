"""Shared fixtures: where the asset mirror is (tests that need real data skip without it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def mirror_dir() -> Path:
    return Path(os.environ.get("CONDIQUANT_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = mirror_dir()
    if not (path / "MANIFEST.sha256").is_file():
        pytest.skip(f"asset mirror not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite is specified to run on one thread; keeps timings comparable across machines.
    torch.set_num_threads(1)
