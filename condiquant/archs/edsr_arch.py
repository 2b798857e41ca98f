"""EDSR (Lim et al., 2017, "Enhanced Deep Residual Networks for Single Image Super-Resolution").

The module tree reproduces the state-dict layout of BasicSR's EDSR checkpoints
(``EDSR_M*_f64b16`` and ``EDSR_L*_f256b32``)::

    conv_first.{weight,bias}
    body.<i>.conv1.{weight,bias}, body.<i>.conv2.{weight,bias}
    conv_after_body.{weight,bias}
    upsample.<0,2,...>.{weight,bias}      (conv before every PixelShuffle)
    conv_last.{weight,bias}
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from condiquant.archs.registry import register_arch

# DIV2K RGB mean used by the official EDSR and SwinIR checkpoints.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def pixel_shuffle_upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """EDSR-style upsampler: ``[conv3x3(num_feat -> r^2 * num_feat), PixelShuffle(r)]`` per stage.

    A power-of-two ``scale`` uses log2(scale) stages with r = 2 (none for scale 1); scale 3 uses a single r = 3
    stage. Convs sit at the even indices, which is where the checkpoints expect them.
    """
    if scale == 3:
        factors = [3]
    elif scale >= 1 and scale & (scale - 1) == 0:
        factors = [2] * (scale.bit_length() - 1)
    else:
        raise ValueError(f"upscale {scale} is not supported; use a power of two or 3")
    stages = []
    for r in factors:
        stages += [nn.Conv2d(num_feat, r * r * num_feat, 3, 1, 1), nn.PixelShuffle(r)]
    return nn.Sequential(*stages)


class ResidualBlockNoBN(nn.Module):
    """``x + res_scale * conv2(relu(conv1(x)))``, no batch norm."""

    def __init__(self, num_feat: int, res_scale: float) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x))) * self.res_scale


@register_arch
class EDSR(nn.Module):
    """EDSR super-resolution network; input and output images are in [0, 1].

    Args:
        num_in_ch: input image channels.
        num_out_ch: output image channels.
        num_feat: feature channels (64 for EDSR-M, 256 for EDSR-L).
        num_block: residual blocks in the trunk (16 for EDSR-M, 32 for EDSR-L).
        upscale: scale factor, a power of two or 3.
        res_scale: residual scaling inside each block (1 for EDSR-M, 0.1 for EDSR-L).
        img_range: the network was trained on ``(x - mean) * img_range``; 255 for the official weights.
        rgb_mean: per-channel mean subtracted before the network and added back after it.
    """

    # Convolutional network: any input size works, the runner needs no padding.
    window_size = 1

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 16,
        upscale: int = 4,
        res_scale: float = 1.0,
        img_range: float = 255.0,
        rgb_mean: Sequence[float] = DIV2K_RGB_MEAN,
    ) -> None:
        super().__init__()
        self.upscale = upscale
        self.img_range = img_range
        # Not persistent: the checkpoints do not store the mean, so it must stay out of the state dict.
        self.register_buffer("mean", torch.tensor(rgb_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)))
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = pixel_shuffle_upsampler(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C_out, H * upscale, W * upscale)."""
        x = (x - self.mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.body(feat)) + feat
        out = self.conv_last(self.upsample(feat))
        return out / self.img_range + self.mean
