"""Uniform affine fake quantizer with learnable lower/upper bounds (2DQuant, Eq. 1-2).

    v_c = clip(v, l, u);  s = (u - l) / (2^N - 1);  v_q = s * round((v_c - l) / s) + l

Rounding uses the straight-through estimator, which yields the paper's bound gradients
dv_q/du = H(v - u) + v_r / (2^N - 1) - (v_c - l) / (u - l), and symmetrically for l; ``fake_quant`` computes
them in closed form (``fake_quant_reference`` is the same op written with autograd, for the tests).
The quantizer never chooses its own range: an observer (``observers.py``) sets the bounds during calibration.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even, as torch.round) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def fake_quant_reference(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Eq. 1 written with autograd ops; the definition ``fake_quant`` must match (kept for the tests)."""
    scale = (upper - lower) / (2 ** n_bits - 1)
    clipped = torch.minimum(torch.maximum(x, lower), upper)
    return round_ste((clipped - lower) / scale) * scale + lower


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a full-size gradient down to a bound's shape: () per tensor, or size 1 on every non-channel dim."""
    if like.dim() == 0:
        return grad.sum()
    return grad.sum(dim=[d for d, n in enumerate(like.shape) if n == 1], keepdim=True)


class _FakeQuant(torch.autograd.Function):
    """Eq. 1 with the Eq. 2 gradients in closed form: saves only the input and recomputes the rest, which
    is several times cheaper in memory and time than differentiating the op chain (DQC's hot path)."""

    @staticmethod
    def forward(ctx, x, lower, upper, n_bits: int):
        levels = 2 ** n_bits - 1
        width = torch.clamp(upper - lower, min=1e-8)  # a collapsed range (constant input) must not divide by 0
        scale = width / levels
        # in place on one fresh tensor: the same ops in the same order (bit-identical), ~3x faster on big maps
        out = torch.clamp(x, lower, lower + width)
        out.sub_(lower).div_(scale).round_().mul_(scale).add_(lower)
        ctx.save_for_backward(x, lower, width)
        ctx.levels = levels
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lower, width = ctx.saved_tensors
        upper = lower + width
        below, above = x < lower, x > upper
        frac = (torch.minimum(torch.maximum(x, lower), upper) - lower) / width  # (v_c - l) / (u - l)
        # dv_q/du = H(v - u) + v_r/(2^N - 1) - (v_c - l)/(u - l);  dv_q/dl = H(l - v) - (same two terms)
        common = torch.round(frac * ctx.levels) / ctx.levels - frac
        grad_upper = _reduce_to(grad * (above.to(grad.dtype) + common), upper)
        grad_lower = _reduce_to(grad * (below.to(grad.dtype) - common), lower)
        grad_x = grad * ~(below | above)
        return grad_x, grad_lower, grad_upper, None


def fake_quant(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto 2^n_bits levels spanning [lower, upper] (broadcast against ``x``)."""
    return _FakeQuant.apply(x, lower, upper, n_bits)


class Observer:
    """Interface of a range observer: sees tensors during calibration, then proposes bounds."""

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class UniformQuantizer(nn.Module):
    """Fake quantizer for one tensor, per-tensor or per-channel (``channel_axis``) bounds.

    States: inactive until bounds are set (``initialized``); while an observer is attached it records its input
    and passes it through unchanged (2DQuant's calibration semantics: every range is fitted on FP activations).
    """

    def __init__(self, n_bits: int, num_channels: int = 1, channel_axis: Optional[int] = None):
        super().__init__()
        if n_bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit-width {n_bits} (supported: {SUPPORTED_BITS})")
        if channel_axis is None and num_channels != 1:
            raise ValueError("per-tensor quantizer must have num_channels == 1")
        self.n_bits = n_bits
        self.channel_axis = channel_axis
        self._make_bounds(num_channels)
        # A buffer, so a saved quantized checkpoint restores quantizers in their active state.
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.observer: Optional[Observer] = None

    def _make_bounds(self, num_channels: int) -> None:
        self.lower = nn.Parameter(torch.zeros(num_channels))
        self.upper = nn.Parameter(torch.ones(num_channels))

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_axis is None else f"channel(axis={self.channel_axis})"
        return f"bits={self.n_bits}, granularity={gran}"

    def _broadcast(self, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return b.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return b.reshape(shape)

    @torch.no_grad()
    def set_bounds(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        self.lower.copy_(torch.as_tensor(lower, dtype=self.lower.dtype).reshape(self.lower.shape))
        self.upper.copy_(torch.as_tensor(upper, dtype=self.upper.dtype).reshape(self.upper.shape))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if not self.enabled or not bool(self.initialized):
            return x
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The rounding itself (subclasses with another grid override only this)."""
        return fake_quant(x, self._broadcast(self.lower, x), self._broadcast(self.upper, x), self.n_bits)


class SymmetricQuantizer(UniformQuantizer):
    """A uniform grid centred on an exact zero: codes -2^(b-1) .. 2^(b-1) - 1 times one step s, so
    (l, u) = (-2^(b-1) s, (2^(b-1) - 1) s), the usual int8 weight grid (zero point 0). Only ``upper`` is a parameter;
    ``lower`` follows it. ONNX Runtime runs convolutions whose int8 weights have zero point 0 with its symmetric
    kernels (``quant.w_symmetric``; scripts/bench_deploy.py)."""

    def _make_bounds(self, num_channels: int) -> None:
        self.upper = nn.Parameter(torch.ones(num_channels))

    @property
    def ratio(self) -> float:
        """-l / u of the grid: 2^(b-1) / (2^(b-1) - 1)."""
        half = 2 ** (self.n_bits - 1)
        return half / (half - 1)

    @property
    def lower(self) -> torch.Tensor:
        return -self.ratio * self.upper

    @torch.no_grad()
    def set_bounds(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        """The smallest symmetric grid that covers [lower, upper]; a ``lower`` within float rounding of
        -ratio * ``upper`` (a symmetric grid's own bounds) keeps ``upper`` exactly."""
        lower = torch.as_tensor(lower, dtype=self.upper.dtype).reshape(self.upper.shape)
        upper = torch.as_tensor(upper, dtype=self.upper.dtype).reshape(self.upper.shape)
        cover = -lower / self.ratio
        self.upper.copy_(torch.where(cover > upper * (1 + 1e-6), cover, upper).clamp(min=1e-8))
        self.initialized.fill_(True)
