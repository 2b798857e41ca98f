"""Dual-region (piecewise linear) activation quantizer of OAQ (papers.md §3.3) and its observer.

A learnable breakpoint bp > 0 splits [l_a, u_a] into a dense region [-bp, bp] and outlier tails [l_a, -bp) and
(bp, u_a]; each region is quantized uniformly on its own grid, with straight-through rounding, so autograd
gives the bounds and the breakpoint their gradients through the regions' affine maps.

Level counts (``levels``):

- ``paper``: the dense region gets 2^(b-1) - 1 points (its grid includes -bp, 0 and bp) and each tail
  2^(b-2) - 1 points in (bp, u_a] (u_a included, bp belongs to the dense grid): 2^b - 3 levels in all,
  13 at b = 4 (3.70 bits). At b = 2 the tails get no point, so tail values are clipped to +-bp; the paper's
  single dense point would then make the input constant, so the dense grid keeps the three points
  {-bp, 0, bp} that the clipping needs (3 levels, 1.58 bits).
  One-sided input (l_a >= -bp, the lower tail is empty): the dense grid spans [l_a, bp] with the same number
  of points and the upper tail gets both tails' points, so the level count does not change.
- ``code`` (the released OAQ-SR code): dense symmetric b-bit (scale 2bp / (2^b - 1), integers clamped to
  [-2^(b-1), 2^(b-1) - 1]) plus a (b-1)-bit affine grid on each tail: 2^b + 2 * 2^(b-1) levels, 32 at b = 4
  (5 bits); the lowest dense integer -2^(b-1) is only reached at x = -bp exactly. One-sided input: two affine
  b-bit grids on [l_a, bp] and [bp, u_a] (2^(b+1) - 1 levels).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn

from condiquant.quant.observers import _SamplingObserver
from condiquant.quant.quantizer import UniformQuantizer, round_ste

Levels = Literal["paper", "code"]
Init = Literal["pooled", "code"]
_EPS = 1e-8  # smallest region width / breakpoint: a collapsed region must not divide by zero


def _affine(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform grid of ``steps + 1`` points on [lo, hi] (both included); ``steps == 0`` clips to ``lo``."""
    if steps == 0:
        return lo.expand_as(x)
    width = torch.clamp(hi - lo, min=_EPS)
    scale = width / steps
    clipped = torch.minimum(torch.maximum(x, lo), lo + width)
    return round_ste((clipped - lo) / scale) * scale + lo


def region_points(n_bits: int, levels: Levels) -> tuple[int, int]:
    """(dense points, points per tail) of the paper variant, or of the code variant's grids."""
    if levels == "paper":
        return max(2 ** (n_bits - 1) - 1, 3), 2 ** (n_bits - 2) - 1
    return 2 ** n_bits, 2 ** (n_bits - 1)


def dual_region_quant(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, bp: torch.Tensor, n_bits: int,
                      levels: Levels) -> torch.Tensor:
    """Quantize-dequantize ``x`` (per-tensor scalars ``lower``, ``upper``, ``bp``)."""
    bp = torch.clamp(bp, min=_EPS)
    x = torch.minimum(torch.maximum(x, lower), upper)
    dense_n, tail_n = region_points(n_bits, levels)
    one_sided = bool(lower >= -bp)
    if levels == "paper":
        if one_sided:
            dense = _affine(x, lower, bp, dense_n - 1)
            return torch.where(x > bp, _affine(x, bp, upper, 2 * tail_n), dense)
        dense = _affine(x, -bp, bp, dense_n - 1)
        low_tail = -_affine(-x, bp, -lower, tail_n)  # mirrored, so the tail grid includes l_a, as the upper u_a
        return torch.where(x > bp, _affine(x, bp, upper, tail_n), torch.where(x < -bp, low_tail, dense))
    if one_sided:
        return torch.where(x > bp, _affine(x, bp, upper, dense_n - 1), _affine(x, lower, bp, dense_n - 1))
    scale = 2 * bp / (dense_n - 1)
    # Clamping before rounding gives the code's integers (only x = bp would round to 2^(b-1)) and keeps the
    # straight-through surrogate free of a kink at the top integer.
    dense = round_ste(torch.clamp(x / scale, -dense_n // 2, dense_n // 2 - 1)) * scale
    tails = torch.where(x > bp, _affine(x, bp, upper, tail_n - 1), _affine(x, lower, -bp, tail_n - 1))
    return torch.where(x.abs() > bp, tails, dense)


class DualRegionQuantizer(UniformQuantizer):
    """Per-tensor activation quantizer with learnable ``lower``, ``upper`` and ``breakpoint``.

    A UniformQuantizer subclass, so every loop over quantizers (calibration, enabling, bound training) sees it;
    ``bp_percentile`` is only read by :class:`DualRegionObserver`.
    """

    def __init__(self, n_bits: int, levels: Levels = "paper", bp_percentile: float = 99.0, init: Init = "pooled"):
        super().__init__(n_bits)
        self.levels = levels
        self.bp_percentile = bp_percentile
        self.init = init
        self.breakpoint = nn.Parameter(torch.full((1,), 0.5))

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, levels={self.levels}"

    @torch.no_grad()
    def set_breakpoint(self, bp: torch.Tensor) -> None:
        self.breakpoint.copy_(torch.as_tensor(bp, dtype=self.breakpoint.dtype).reshape(1))

    def effective_bits(self) -> float:
        """log2 of the number of distinct levels at the current bounds."""
        dense_n, tail_n = region_points(self.n_bits, self.levels)
        one_sided = bool(self.lower >= -self.breakpoint)
        if self.levels == "paper":
            return math.log2(dense_n + 2 * tail_n)
        return math.log2(2 * dense_n - 1 if one_sided else dense_n + 2 * tail_n)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return dual_region_quant(x, self.lower.reshape(()), self.upper.reshape(()), self.breakpoint.reshape(()),
                                 self.n_bits, self.levels)


class DualRegionObserver(_SamplingObserver):
    """Initial l_a, u_a and breakpoint from the calibration activations (OAQ's minmax + percentile init).

    ``pooled`` (default): exact min/max over all calibration batches, bp = the ``percentile``-th percentile of |x|
    over the pooled value sample, as the other observers pool their data. ``code`` (the released OAQ-SR code):
    l_a, u_a are an EMA (beta 0.9) of the per-batch min/max, and bp is the signed ``percentile``-th quantile of the
    last batch (its bp EMA is a no-op). Either way a bp that is <= 0 or reaches max |x| falls back to
    max |x| / 2. (Gradients also differ slightly from the released code: here clipping passes the bound
    gradients of 2DQuant's Eq. 2 and the bp clamp at 1e-8 stops its gradient; see papers.md §3.3.)
    """

    def __init__(self, percentile: float = 99.0, init: Init = "pooled", **kwargs):
        super().__init__(channel_axis=None, **kwargs)
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"bp percentile must be in (0, 100), got {percentile}")
        self.q = percentile / 100.0
        self.init = init
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_bp: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        if self.init == "code":
            flat = x.detach().float().flatten().cpu()
            lo, hi = flat.min().reshape(1), flat.max().reshape(1)
            self.ema = (lo, hi) if self.ema is None else (0.9 * self.ema[0] + 0.1 * lo, 0.9 * self.ema[1] + 0.1 * hi)
            self.last_bp = _kth(flat, self.q)

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ema if self.init == "code" else super().bounds(n_bits)

    def breakpoint(self) -> torch.Tensor:
        bp = self.last_bp.reshape(()) if self.init == "code" else _kth(self.samples().abs().flatten(), self.q)
        top = torch.maximum(self.lo.abs(), self.hi.abs()).reshape(())
        return torch.where((bp <= 0) | (bp >= top), top / 2, bp)


def _kth(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a flat tensor by rank (kthvalue: exact, no size cap, unlike torch.quantile)."""
    k = max(1, min(values.numel(), int(round(q * (values.numel() - 1))) + 1))
    return values.kthvalue(k).values
