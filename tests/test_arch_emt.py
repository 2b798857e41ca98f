"""EMT: official checkpoints load strictly and run on an input that is not a multiple of the windows."""
from __future__ import annotations

import pytest
import torch

from condiquant.archs.emt_arch import EMT
from condiquant.archs.ops import MatMul

# 20x24 is a multiple of neither stripe (32x8, 8x32), so both attention branches pad and crop internally.
H, W = 20, 24


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_emt_pretrained_forward(mirror, scale: int) -> None:
    path = mirror / "weights" / f"EMT_LSR_x{scale}.pth"
    net = EMT(upscale=scale)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["params"], strict=True)
    net.eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, H, W) * EMT.input_range
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 3, H * scale, W * scale)
    assert torch.isfinite(y).all()


def test_emt_attention_products_go_through_matmul() -> None:
    net = EMT(upscale=2, n_blocks=1).eval()
    matmuls = [m for m in net.modules() if isinstance(m, MatMul)]
    # n_GTLs=2 attention layers x 2 stripe branches x (QK^T, AV)
    assert len(matmuls) == 8
    calls: list[int] = []
    for m in matmuls:
        m.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        net(torch.rand(1, 3, H, W) * EMT.input_range)
    assert len(calls) == len(matmuls)
