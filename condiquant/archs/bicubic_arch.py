"""Bicubic upsampling as a 'network', for the Bicubic rows of SR tables (MATLAB ``imresize``, uint8)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from condiquant.archs.registry import register_arch
from condiquant.data.imresize import imresize_uint8


@register_arch
class Bicubic(nn.Module):
    """MATLAB bicubic upscaling of the (uint8) LR image; no parameters."""

    def __init__(self, upscale: int = 4):
        super().__init__()
        self.upscale = upscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for img in x:
            lr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
            out.append(torch.from_numpy(imresize_uint8(lr, self.upscale)).permute(2, 0, 1).float() / 255.0)
        return torch.stack(out).to(x.device)
