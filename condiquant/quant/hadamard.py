"""CompSRT's quantizer (arXiv 2601.21069; facts from its ``quant_arch.py``, see docs/papers.md §6.1): a Hadamard
transform *inside* the fake quantizer, and its "scalar decomposition" of the grid.

The tensor's ``axis`` is zero-padded to the next power of two n, rotated by H / sqrt(n) (Sylvester H, dense),
quantized, rotated back by the same matrix (H is symmetric, H H = n I) and cropped: the product that follows runs
on the de-rotated FP tensor. Grid: s = (u - l) / (2^b - 1) + alpha, Z = l + beta, code round((clip(y, l, u) - Z) / s)
not clamped to [0, 2^b - 1] (as the released code; ``quant.hadamard_codes: clamped`` clamps it, so that the grid
keeps 2^b codes whatever alpha becomes), with alpha and beta trainable (zero at the start, so the initial grid is
2DQuant's). Nothing can be folded into an integer kernel: for attention x V the rotated axis of V is
not the reduction axis, and the crop after the inverse transform leaves the rotated domain; so ``quant.hadamard``
rows are marked not deployable and the packed / ONNX exports refuse them.

Axes: CompSRT rotates the last dimension of every quantized tensor (Linear inputs and weights, q, k^T, the
attention map, v). Here a Linear's input and weight rotate along the input features, a convolution's (EMT's 1x1,
IMDN's 3x3; CompSRT leaves SwinIR's convolutions FP) along its input channels, and the MatMul inputs along their
last dimension, as CompSRT.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from condiquant.quant.quantizer import UniformQuantizer, round_ste


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class HadamardQuantizer(UniformQuantizer):
    def __init__(self, n_bits: int, num_channels: int = 1, channel_axis: Optional[int] = None, axis: int = -1,
                 clamp_codes: bool = False):
        super().__init__(n_bits, num_channels, channel_axis)
        self.axis = axis
        self.clamp_codes = clamp_codes
        self.alpha = nn.Parameter(torch.zeros(num_channels))
        self.beta = nn.Parameter(torch.zeros(num_channels))
        self._h: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hadamard axis={self.axis}" + (", codes clamped" if self.clamp_codes else "")

    def _matrix(self, d: int, like: torch.Tensor) -> torch.Tensor:
        n = 1 << max(d - 1, 0).bit_length()
        if self._h is None or self._h.shape[0] != n or self._h.dtype != like.dtype or self._h.device != like.device:
            self._h = (_sylvester(n) / math.sqrt(n)).to(like)
        return self._h

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x moved to (..., d) along ``axis``, zero-padded to n, times H / sqrt(n)."""
        y = x.movedim(self.axis, -1)
        h = self._matrix(y.shape[-1], y)
        return nn.functional.pad(y, (0, h.shape[0] - y.shape[-1])) @ h

    def _back(self, y: torch.Tensor, d: int) -> torch.Tensor:
        return (y @ self._matrix(d, y))[..., :d].movedim(-1, self.axis)

    def _broadcast_rotated(self, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bounds for the rotated tensor y, whose ``axis`` is now last (per-channel bounds are on axis 0)."""
        if self.channel_axis is None:
            return b.reshape(())
        if self.channel_axis != 0 or self.axis in (0, -y.dim()):
            raise ValueError("per-channel Hadamard quantizers need channel_axis 0 and another rotated axis")
        return b.reshape([-1] + [1] * (y.dim() - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # ranges are fitted on the rotated values
            self.observer.observe(self._rotate(x.detach()).movedim(-1, self.axis))
            return x
        if not self.enabled or not bool(self.initialized):
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[self.axis]
        y = self._rotate(x)
        lo, hi = self._broadcast_rotated(self.lower, y), self._broadcast_rotated(self.upper, y)
        s = (hi - lo) / (2 ** self.n_bits - 1) + self._broadcast_rotated(self.alpha, y)
        z = lo + self._broadcast_rotated(self.beta, y)
        code = round_ste((torch.minimum(torch.maximum(y, lo), hi) - z) / s)
        if self.clamp_codes:
            code = code.clamp(0, 2 ** self.n_bits - 1)
        return self._back(code * s + z, d)


def to_hadamard(module: nn.Module, kind: str, clamp_codes: bool = False) -> None:
    """Replace the uniform quantizers of a freshly quantized module by Hadamard ones of the same shape."""
    for name, q in list(module.named_children()):
        if isinstance(q, nn.ModuleList):
            for i, sub in enumerate(q):
                if type(sub) is UniformQuantizer:
                    weight = name == "weight_quantizers"
                    axis = 1 if weight else (-1 if kind in ("Linear", "MatMul") else 1)
                    q[i] = HadamardQuantizer(sub.n_bits, sub.lower.numel(), sub.channel_axis, axis, clamp_codes)
        elif type(q) is UniformQuantizer:  # MatMul's quant_a / quant_b
            setattr(module, name, HadamardQuantizer(q.n_bits, q.lower.numel(), q.channel_axis, -1, clamp_codes))
