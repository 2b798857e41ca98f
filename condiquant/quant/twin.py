"""PTQ4ViT's twin-uniform quantizers (Yuan et al., ECCV 2022; facts from the paper and its released code).

Two uniform grids of 2^(b-1) codes each; one bit says which grid a value is on:
- post-softmax maps (values in [0, 1]): the large grid has the fixed step d2 = 1 / (2^(b-1) - 1) (codes up to 1),
  the small grid d1 = d2 / 2^m (m searched); values below 2^(b-1) d1 use the small grid, the others the large one
  (the paper's rule; the released code adds the two grids' outputs, which offsets large values by the split);
- post-activation inputs (after GELU / Swish, one-sided with a small negative tail): negative values on
  d_neg = |min| / 2^(b-1), codes -2^(b-1) .. 0; non-negative values on d_pos (searched), codes 0 .. 2^(b-1) - 1.
The two steps are the ``steps`` buffer (small/negative, large/positive); rounding is straight-through. No integer
kernel runs these grids: rows using them are marked not deployable.
"""
from __future__ import annotations

import torch

from condiquant.quant.quantizer import UniformQuantizer


def _straight_through(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` with the identity gradient to ``x`` (nothing to add when ``x`` needs none, e.g. when scoring)."""
    return out + (x - x.detach()) if x.requires_grad else out


def _grid(x: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.div(x, step).round_().clamp_(lo, hi).mul_(step)  # in place on one fresh tensor


def twin_softmax(x: torch.Tensor, small: torch.Tensor, large: torch.Tensor, n_bits: int) -> torch.Tensor:
    top = 2 ** (n_bits - 1) - 1
    xd = x.detach()
    out = torch.where(xd < (top + 1) * small, _grid(xd, small, 0, top), _grid(xd, large, 0, top))
    return _straight_through(out, x)


def twin_activation(x: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor, n_bits: int) -> torch.Tensor:
    half = 2 ** (n_bits - 1)
    xd = x.detach()
    return _straight_through(_grid(xd, pos, 0, half - 1).add_(_grid(xd, neg, -half, 0)), x)


class TwinUniformQuantizer(UniformQuantizer):
    """Per-tensor twin-uniform quantizer; ``kind`` is ``softmax`` or ``activation``. ``set_bounds`` (an
    observer's min / max) sets the initial steps; a search may then change them with ``set_steps``."""

    def __init__(self, n_bits: int, kind: str):
        super().__init__(n_bits)
        if kind not in ("softmax", "activation"):
            raise ValueError(f"twin-uniform kind must be 'softmax' or 'activation', got {kind!r}")
        self.kind = kind
        self.register_buffer("steps", torch.ones(2))

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, twin {self.kind}"

    @torch.no_grad()
    def set_bounds(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        super().set_bounds(lower, upper)
        half = 2 ** (self.n_bits - 1)
        if self.kind == "softmax":
            large = 1.0 / (half - 1)
            self.set_steps(large / 2 ** 4, large)
        else:
            self.set_steps(max(-float(self.lower), 1e-8) / half, max(float(self.upper), 1e-8) / (half - 0.5))

    @torch.no_grad()
    def set_steps(self, first: float, second: float) -> None:
        self.steps.copy_(torch.tensor([first, second], dtype=self.steps.dtype))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.steps[0], self.steps[1]
        if self.kind == "softmax":
            return twin_softmax(x, a, b, self.n_bits)
        return twin_activation(x, a, b, self.n_bits)
