"""Learned rounding of weights (AdaRound, Nagel et al., ICML 2020), on the affine grid of ``UniformQuantizer``.

    code = clamp(floor((w - l) / s) + h(V), 0, 2^b - 1),   w_q = s * code + l
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1  (rectified sigmoid)

V starts where h(V) equals the fractional part (the soft quantizer then returns the clipped weight itself) and is
pushed to 0 or 1 by the regulariser sum(1 - |2h(V) - 1|^beta) with beta annealed from high to low. ``hard``
rounds up exactly where V >= 0, which is round-to-nearest at the start. The bounds stay fixed while V learns.

A checkpoint never holds V: :func:`bake_rounding` writes the hardened weights (on the grid, so the plain fake
quantizer reproduces them bit for bit) and puts back ``UniformQuantizer``s, so test.py, the packed format and the
ONNX export see an ordinary quantized model.
"""
from __future__ import annotations

import copy
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

from condiquant.quant.modules import QuantConv2d, QuantLinear
from condiquant.quant.quantizer import UniformQuantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRoundQuantizer(UniformQuantizer):
    """The weight quantizer of one weight tensor (or qkv chunk) with a rounding variable per element."""

    def __init__(self, src: UniformQuantizer, weight: torch.Tensor):
        super().__init__(src.n_bits, src.lower.numel(), src.channel_axis)
        with torch.no_grad():
            self.lower.copy_(src.lower)
            self.upper.copy_(src.upper)
        self.initialized.copy_(src.initialized)
        self.enabled = src.enabled
        self.plain_type = type(src)  # what bake_rounding puts back (a symmetric grid stays symmetric)
        self.levels = 2 ** src.n_bits - 1
        frac = self._codes(weight.detach())[1]
        p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.rounding = nn.Parameter(torch.log(p / (1 - p)))  # h(V) = frac
        self.hard = True

    def _codes(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """floor and fractional part of the position of ``w`` on the grid (unclipped: a weight beyond a bound
        stays at that bound whichever way it rounds); the same float ops as ``fake_quant``."""
        lower, upper = self._broadcast(self.lower, w).detach(), self._broadcast(self.upper, w).detach()
        pos = (w - lower) / (torch.clamp(upper - lower, min=1e-8) / self.levels)
        base = torch.floor(pos)
        return base, pos - base

    def up(self) -> torch.Tensor:
        """Per element: 1 where the weight is rounded up (hard), else the soft h(V)."""
        return (self.rounding >= 0).to(self.rounding.dtype) if self.hard else rectified_sigmoid(self.rounding)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        lower, upper = self._broadcast(self.lower, w).detach(), self._broadcast(self.upper, w).detach()
        scale = torch.clamp(upper - lower, min=1e-8) / self.levels
        code = torch.clamp(self._codes(w.detach())[0] + self.up(), 0, self.levels)
        return code * scale + lower

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h(V) - 1|^beta): zero only when every h(V) is 0 or 1."""
        return (1 - (2 * rectified_sigmoid(self.rounding) - 1).abs().pow(beta)).sum()

    def soft_fraction(self) -> float:
        """Share of elements whose h(V) is not yet within 0.01 of 0 or 1."""
        h = rectified_sigmoid(self.rounding.detach())
        return float(((h > 0.01) & (h < 0.99)).float().mean())


def _weight_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and len(module.weight_quantizers):
            yield name, module


def attach_rounding(model: nn.Module) -> List[str]:
    """Give every initialised weight quantizer of ``model`` learnable rounding (in place); returns the modules."""
    names = []
    for name, module in _weight_modules(model):
        chunks = module.weight.chunk(len(module.weight_quantizers), dim=0)
        module.weight_quantizers = nn.ModuleList(AdaRoundQuantizer(q, w)
                                                 for q, w in zip(module.weight_quantizers, chunks))
        names.append(name)
    return names


def has_rounding(model: nn.Module) -> bool:
    return any(isinstance(m, AdaRoundQuantizer) for m in model.modules())


@torch.no_grad()
def bake_rounding(model: nn.Module) -> nn.Module:
    """Harden every learned rounding into the weights and restore plain quantizers (in place); returns ``model``."""
    for _, module in _weight_modules(model):
        qs = module.weight_quantizers
        if not any(isinstance(q, AdaRoundQuantizer) for q in qs):
            continue
        chunks = module.weight.chunk(len(qs), dim=0)
        baked, plain = [], []
        for q, w in zip(qs, chunks):
            if isinstance(q, AdaRoundQuantizer):
                q.hard = True
                baked.append(q.quantize(w))
                p = q.plain_type(q.n_bits, q.upper.numel(), q.channel_axis)
                keys = p.state_dict().keys()
                p.load_state_dict({k: v for k, v in q.state_dict().items() if k in keys})
                p.enabled = q.enabled
                plain.append(p)
            else:
                baked.append(w.clone())
                plain.append(q)
        module.weight.copy_(torch.cat(baked, dim=0))
        module.weight_quantizers = nn.ModuleList(plain)
    return model


def baked_copy(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no learned rounding, else a baked deep copy (for checkpoints mid-training)."""
    return bake_rounding(copy.deepcopy(model)) if has_rounding(model) else model
