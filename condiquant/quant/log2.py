"""RepQ-ViT's log√2 quantizer for post-softmax maps (papers.md §4.1): codes q = round(-2 log2(x / s)), values
s · 2^(-q/2), so the grid is dense near 0, where almost all attention probabilities lie.

b bits give 2^b codes: q = 0 .. 2^b - 2 are the powers of √2 below s, and the last code is exact zero (values
below the smallest power round to 0; RepQ-ViT's code maps them to 0 as well). s is the quantizer's ``upper``
bound (an observer's max; post-softmax maps are in [0, 1]); ``lower`` is unused. Rounding is straight-through.
"""
from __future__ import annotations

import torch

from condiquant.quant.quantizer import UniformQuantizer


def log2_quant(x: torch.Tensor, scale: torch.Tensor, n_bits: int) -> torch.Tensor:
    top = 2 ** n_bits - 2  # the largest code that is not zero
    xd = x.detach()
    # codes computed in place on one fresh tensor (scoring runs this on every attention map)
    code = torch.clamp(xd, min=1e-30).div_(scale.detach()).log2_().mul_(-2).round_().clamp_(min=0)
    keep = (code <= top) & (xd > 0)  # integer-valued codes: exact powers of √2 below s, else zero
    # one table of the 2^b - 1 powers: torch's vectorised exp2 is not bit-identical across elements of one call
    powers = torch.exp2(-torch.arange(top + 1, dtype=x.dtype, device=x.device) / 2)
    value = scale * powers[code.clamp_(max=top).long()]  # differentiable in the scale
    if x.requires_grad:  # straight-through for the input where it is not sent to zero
        value = value + (x - xd)
    return value.masked_fill_(~keep, 0)


class Log2Quantizer(UniformQuantizer):
    """Per-tensor log√2 quantizer of a non-negative input (``quant.softmax_quantizer: log2``)."""

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return log2_quant(x, self.upper.reshape(()), self.n_bits)
