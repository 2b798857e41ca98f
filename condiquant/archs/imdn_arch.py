"""IMDN: Information Multi-Distillation Network (Hui et al., ACM MM 2019).

State-dict keys and shapes follow the official checkpoints (Zheng222/IMDN ``checkpoints/IMDN_x{2,3,4}.pth``,
saved from ``nn.DataParallel`` so their keys carry a ``module.`` prefix that the loader strips).
Input and output are RGB in 0..1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from condiquant.archs.registry import register_arch

_LRELU_SLOPE = 0.05  # the official blocks use LeakyReLU(0.05), not PyTorch's default 0.01


def _conv(in_ch: int, out_ch: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, k, padding=k // 2)


class ContrastChannelAttention(nn.Module):
    """CCA: channel gate from (per-channel std + per-channel mean) through a 2-layer bottleneck."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()  # population std, as in the paper
        return x * self.conv_du(std + mean)


class IMDBlock(nn.Module):
    """Information multi-distillation block: three 3x3 convs each keep 1/4 of their channels ("distil")."""

    def __init__(self, channels: int = 64, distillation_rate: float = 0.25):
        super().__init__()
        self.distilled = int(channels * distillation_rate)
        self.remaining = channels - self.distilled
        self.c1 = _conv(channels, channels, 3)
        self.c2 = _conv(self.remaining, channels, 3)
        self.c3 = _conv(self.remaining, channels, 3)
        self.c4 = _conv(self.remaining, self.distilled, 3)
        self.c5 = _conv(self.distilled * 4, channels, 1)
        self.act = nn.LeakyReLU(_LRELU_SLOPE)
        self.cca = ContrastChannelAttention(self.distilled * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = []
        out = x
        for conv in (self.c1, self.c2, self.c3):
            d, out = torch.split(self.act(conv(out)), (self.distilled, self.remaining), dim=1)
            kept.append(d)
        kept.append(self.c4(out))
        return self.c5(self.cca(torch.cat(kept, dim=1))) + x


@register_arch
class IMDN(nn.Module):
    """IMDN for a fixed integer ``upscale``; six IMDBs, 64 features (the official x2/x3/x4 models)."""

    def __init__(self, in_nc: int = 3, nf: int = 64, num_modules: int = 6, out_nc: int = 3, upscale: int = 4):
        super().__init__()
        self.upscale = upscale
        self.fea_conv = _conv(in_nc, nf, 3)
        # Named IMDB1..IMDB6 (not a ModuleList) to keep the official state-dict keys.
        self.num_modules = num_modules
        for i in range(1, num_modules + 1):
            self.add_module(f"IMDB{i}", IMDBlock(nf))
        self.c = nn.Sequential(nn.Conv2d(nf * num_modules, nf, 1), nn.LeakyReLU(_LRELU_SLOPE))
        self.LR_conv = _conv(nf, nf, 3)
        self.upsampler = nn.Sequential(_conv(nf, out_nc * upscale ** 2, 3), nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.fea_conv(x)
        outs = []
        out = fea
        for i in range(1, self.num_modules + 1):
            out = getattr(self, f"IMDB{i}")(out)
            outs.append(out)
        body = self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea
        return self.upsampler(body)
