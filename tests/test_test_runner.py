"""test.py end to end on tiny data, and its one-line errors for bad options."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from condiquant.archs import build_network
from condiquant.cli import main_test
from condiquant.data.paired import write_image

TINY_IMDN = {"nf": 16, "num_modules": 2}


def _make_hr(folder: Path, n: int = 2, size=(26, 30)) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_image(folder / f"img{i}.png", rng.integers(0, 256, (*size, 3)).astype(np.uint8))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A tiny project: 2 HR images and a random-weight tiny IMDN checkpoint at x2."""
    monkeypatch.chdir(tmp_path)
    _make_hr(tmp_path / "data" / "Tiny" / "HR")
    torch.manual_seed(0)
    net = build_network({"type": "IMDN", **TINY_IMDN, "upscale": 2})
    torch.save({"params": net.state_dict()}, tmp_path / "tiny_x2.pth")
    return tmp_path


def _options(**changes):
    opts = {
        "name": "tiny",
        "scale": 2,
        "network_g": {"type": "IMDN", **TINY_IMDN, "upscale": 2},
        "path": {"pretrain_network_g": "tiny_x2.pth"},
        "datasets": {"test_1": {"name": "Tiny", "dataroot_gt": "data/Tiny/HR"}},
        "val": {"save_img": True},
    }
    for key, value in changes.items():
        node = opts
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return opts


def _run(workdir: Path, opts, extra=()):
    path = workdir / "opt.yml"
    path.write_text(yaml.safe_dump(opts))
    return main_test(["-opt", str(path), *extra])


def test_round_trip_writes_results_and_generates_lr(workdir):
    assert _run(workdir, _options()) == 0
    out = workdir / "results" / "tiny"
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["datasets"]["Tiny"]["images"]) == 2
    assert (workdir / "data" / "Tiny" / "LR_bicubic" / "X2" / "img0x2.png").is_file()  # cached MATLAB LR
    assert (out / "visualization" / "Tiny" / "img0.png").is_file()
    assert "| Tiny |" in (out / "metrics.md").read_text()
    # A second run archives the first folder instead of overwriting it.
    assert _run(workdir, _options(), ["--set", "val.save_img=false"]) == 0
    archived = [p for p in (workdir / "results").iterdir() if p.name.startswith("tiny_archived_")]
    assert len(archived) == 1 and (archived[0] / "metrics.json").is_file()


def test_tiled_inference_stays_close_to_whole_image(workdir):
    _make_hr(workdir / "data" / "Big" / "HR", n=1, size=(96, 80))
    base = _options(**{"datasets.test_1": {"name": "Big", "dataroot_gt": "data/Big/HR"}})
    assert _run(workdir, base) == 0
    tiled = _options(**{"datasets.test_1": {"name": "Big", "dataroot_gt": "data/Big/HR"}, "name": "tiled",
                        "val": {"tile": 24, "tile_overlap": 8}})
    assert _run(workdir, tiled) == 0
    whole = json.loads((workdir / "results" / "tiny" / "metrics.json").read_text())["datasets"]["Big"]["psnr"]
    tile = json.loads((workdir / "results" / "tiled" / "metrics.json").read_text())["datasets"]["Big"]["psnr"]
    # IMDN's channel attention uses global image statistics, so tiles differ slightly but not grossly.
    assert abs(whole - tile) < 0.5


@pytest.mark.parametrize("change, message", [
    ({"val.tile_size": 3}, "unknown key 'tile_size'"),
    ({"network_g.type": "NoSuchNet"}, "network_g.type: unknown arch 'NoSuchNet'"),
    ({"network_g.num_blocks": 3}, "network_g.num_blocks: unknown option for IMDN"),
    ({"datasets.test_1.dataroot_gt": "data/Missing/HR"}, "datasets.test_1.dataroot_gt: folder not found"),
    ({"path.pretrain_network_g": "missing.pth"}, "missing.pth: checkpoint not found"),
    ({"scale": "four"}, "scale: expected int"),
])
def test_bad_options_give_one_line_errors(workdir, capsys, change, message):
    assert _run(workdir, _options(**change)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (workdir / "results").exists()  # nothing written on bad input


def test_checkpoint_of_another_scale_or_arch_is_rejected(workdir, capsys):
    assert _run(workdir, _options(**{"network_g.upscale": 3, "scale": 3})) == 2
    assert "tiny_x2.pth: upsampler.0.weight has shape" in capsys.readouterr().err
    torch.save({"params": {"head.weight": torch.zeros(1)}}, workdir / "other.pth")
    assert _run(workdir, _options(**{"path.pretrain_network_g": "other.pth"})) == 2
    assert "keys do not match IMDN" in capsys.readouterr().err


def test_hr_lr_size_mismatch_names_the_file(workdir, capsys):
    lr_dir = workdir / "data" / "Tiny" / "LR_bicubic" / "X2"
    write_image(lr_dir / "img0x2.png", np.zeros((5, 5, 3), np.uint8))
    assert _run(workdir, _options()) == 2
    assert "img0x2.png: LR size 5x5 does not match HR" in capsys.readouterr().err


def test_corrupt_image_names_the_file(workdir, capsys):
    (workdir / "data" / "Tiny" / "HR" / "img1.png").write_bytes(b"not a png")
    assert _run(workdir, _options()) == 2
    assert "img1.png: cannot read image" in capsys.readouterr().err
