"""Shared fixtures: where the asset mirror is (tests that need real data fail without it), a tiny project."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from condiquant.archs import build_network
from condiquant.data.paired import write_image

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are not part of the package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def mirror_dir() -> Path:
    return Path(os.environ.get("CONDIQUANT_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def mirror() -> Path:
    path = mirror_dir()
    if not (path / "MANIFEST.sha256").is_file():
        # The real-weight tests pin published numbers: a CI run without them must not pass silently.
        pytest.fail(f"asset mirror not found at {path} (set CONDIQUANT_ASSETS)")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # The suite is specified to run on one thread; keeps timings comparable across machines.
    torch.set_num_threads(1)


# A tiny PTQ project (tiny IMDN, 6 calibration images, 2 benchmark images) for end-to-end tests.
NET = {"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(6):
        # Smooth-ish images so the network output is not pure noise.
        base = rng.integers(0, 256, (6, 7, 3)).astype(np.float32)
        img = np.kron(base, np.ones((8, 8, 1)))[:44, :52]
        write_image(tmp_path / "calib" / "A" / f"c{i}.png", img.clip(0, 255).astype(np.uint8))
    for i in range(2):
        write_image(tmp_path / "bench" / "HR" / f"b{i}.png", rng.integers(0, 256, (24, 28, 3)).astype(np.uint8))
    torch.manual_seed(0)
    torch.save({"params": build_network(NET).state_dict()}, tmp_path / "fp.pth")
    return tmp_path


def train_options(method: str, **dqc):
    return {
        "name": f"tiny_{method}", "scale": 2, "method": method, "network_g": NET,
        "path": {"pretrain_network_g": "fp.pth"},
        "quant": {"w_bit": 4, "a_bit": 4},
        "calib": {"roots": ["calib/A"], "num_patches": 4, "patch_size": 12, "chunk_size": 2, "val_patch_size": 16},
        "dqc": {"total_iter": 4, "batch_size": 2, "patch_size": 12, "print_freq": 2, "val_freq": 2,
                "save_checkpoint_freq": 2, **dqc},
    }


def write_yaml(project, name, data):
    path = project / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def assert_quantized(project, ckpt, net=NET):
    """The checkpoint rebuilds a model whose quantizers are all initialised and enabled and whose output is not
    the FP model's; returns the model."""
    from condiquant.quant.attach import named_quantizers
    from condiquant.quant.checkpoint import build_quantized

    model = build_quantized(ckpt, net, "test").eval()
    quantizers = dict(named_quantizers(model))
    assert quantizers and all(bool(q.initialized) and q.enabled for q in quantizers.values())
    fp = build_network(net).eval()
    fp.load_state_dict(torch.load(project / "fp.pth", weights_only=True)["params"])
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - fp(x)).abs().max() > 1e-3
    return model
