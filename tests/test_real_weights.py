"""Real pretrained weights on Set5 reproduce the reference numbers of references.yml to 0.01 dB."""
from __future__ import annotations

import pytest
import torch

from condiquant.archs import build_network, load_pretrained
from condiquant.data.paired import PairedImageFolder
from condiquant.scoring import load_references, score_dataset
from condiquant.options import DatasetOptions, ValOptions

CASES = [
    ("IMDN", 2, "IMDN_x2.pth", "IMDN_x2"),
    ("IMDN", 3, "IMDN_x3.pth", "IMDN_x3"),
    ("IMDN", 4, "IMDN_x4.pth", "IMDN_x4"),
    ("EMT", 2, "EMT_LSR_x2.pth", "EMT_x2"),
    ("EMT", 3, "EMT_LSR_x3.pth", "EMT_x3"),
    ("EMT", 4, "EMT_LSR_x4.pth", "EMT_x4"),
]


@pytest.mark.parametrize("arch, scale, weights, ref_key", CASES)
def test_set5_psnr_matches_reference(mirror, arch, scale, weights, ref_key):
    model = build_network({"type": arch, "upscale": scale})
    load_pretrained(model, mirror / "weights" / weights)
    data = PairedImageFolder(
        DatasetOptions(name="Set5", dataroot_gt=str(mirror / "benchmark/Set5/HR"),
                       dataroot_lq=str(mirror / f"benchmark/Set5/LR_bicubic/X{scale}"), generate_lq=False),
        scale, "test")
    score = score_dataset(model.eval(), data, scale, ValOptions(), torch.device("cpu"))
    ref = load_references(ref_key)["Set5"]["psnr"]
    assert abs(score.psnr - ref) <= 0.01, f"{arch} x{scale}: ours {score.psnr:.4f} vs reference {ref}"
