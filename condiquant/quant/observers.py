"""Range observers: MinMax, Percentile, DOBI (2DQuant's Distribution-Oriented Bound Initialization) and
density-based dual clipping (PTQ4SR's DBDC).

Observers see a quantizer's input during calibration and return (lower, upper). Per-channel observers treat
axis ``channel_axis`` as channels. Percentile and DOBI keep a uniform random sample of at most ``max_samples``
values per channel (exact min/max are always tracked), which bounds memory and search time when activations
are large; with inputs smaller than the cap they see every value, as in 2DQuant.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from condiquant.quant.quantizer import Observer, fake_quant


def _as_channels(x: torch.Tensor, channel_axis: Optional[int]) -> torch.Tensor:
    """(C, N) view: one row per channel, or a single row for per-tensor."""
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, channel_axis).reshape(x.shape[channel_axis], -1)


class MinMaxObserver(Observer):
    def __init__(self, channel_axis: Optional[int] = None):
        self.channel_axis = channel_axis
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor) -> None:
        rows = _as_channels(x.float(), self.channel_axis)
        lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data (the module was never called during calibration)")
        return self.lo, self.hi


class _SamplingObserver(MinMaxObserver):
    """MinMax plus a random sample of the values, for observers that need the distribution."""

    def __init__(self, channel_axis: Optional[int] = None, max_samples: int = 1 << 20, seed: int = 0):
        super().__init__(channel_axis)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: List[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        rows = _as_channels(x.float(), self.channel_axis).cpu()
        if self.max_samples and rows.shape[1] > self.max_samples:
            idx = torch.randint(rows.shape[1], (self.max_samples,), generator=self.generator)
            rows = rows[:, idx]
        self.chunks.append(rows)

    def samples(self) -> torch.Tensor:
        rows = torch.cat(self.chunks, dim=1)
        if self.max_samples and rows.shape[1] > self.max_samples:  # several calibration batches
            idx = torch.randint(rows.shape[1], (self.max_samples,), generator=self.generator)
            rows = rows[:, idx]
        return rows


class PercentileObserver(_SamplingObserver):
    """Clip at the ``percentile``-th and (100 - percentile)-th percentiles."""

    def __init__(self, percentile: float = 99.99, **kwargs):
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.q = percentile / 100.0

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.samples()
        # torch.quantile refuses very large inputs; kthvalue is exact and has no size cap.
        n = rows.shape[1]
        k_hi = max(1, min(n, int(round(self.q * (n - 1))) + 1))
        k_lo = max(1, min(n, int(round((1 - self.q) * (n - 1))) + 1))
        return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values


def dobi_search(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_bits: int, steps: int = 100,
                one_direction: bool = False, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DOBI: linear search over ``steps`` candidate ranges minimising ||v - Q(v)||_2 per row.

    Symmetric search (bell-shaped data): l_i = min + i*d, u_i = max - i*d with d = (max - min) / (2K).
    One-direction search (post-softmax / post-GELU data): l stays at min, u_i = max - i*(max - min)/K, so u
    scans the whole range down to min (the released code's one-direction step). Alg. 1's printed step d would
    stop u at the midpoint, where exponential-like data is still far from its best upper bound.
    Symmetric search (:class:`SymmetricQuantizer` grids, l = -r u): u scans from the smallest grid covering
    [min, max] down towards 0 in ``steps`` equal steps.
    """
    d = (hi - lo) / (2 * steps)
    d_u = 2 * d if one_direction else d
    half = 2 ** (n_bits - 1)
    ratio = half / (half - 1)
    top = torch.maximum(hi, -lo / ratio).clamp(min=1e-8)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(steps):
        if symmetric:
            cand_hi = top * (1 - i / steps)
            cand_lo = -ratio * cand_hi
        else:
            cand_lo = lo if one_direction else lo + i * d
            cand_hi = hi - i * d_u
        err = (rows - fake_quant(rows, cand_lo[:, None], cand_hi[:, None], n_bits)).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, cand_lo, best_lo)
        best_hi = torch.where(better, cand_hi, best_hi)
    return best_lo, best_hi


class DOBIObserver(_SamplingObserver):
    def __init__(self, steps: int = 100, one_direction: bool = False, symmetric: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.steps = steps
        self.one_direction = one_direction
        self.symmetric = symmetric

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return dobi_search(self.samples(), self.lo.cpu(), self.hi.cpu(), n_bits, self.steps, self.one_direction,
                           self.symmetric)


def density_clip(x: torch.Tensor, ratio: float, bins: int = 2048) -> tuple[float, float]:
    """PTQ4SR's DBDC on one tensor: histogram of ``bins`` bins over [min, max]; while more than (1 - ratio) of the
    values remain, drop the edge bin holding fewer values (the upper one on ties). Returns the left edge of the first
    kept bin and the right edge of the last (the released code takes the lower bound one bin further right)."""
    lo_v, hi_v = float(x.min()), float(x.max())
    if hi_v <= lo_v:
        return lo_v, hi_v
    hist = torch.histc(x.float(), bins=bins, min=lo_v, max=hi_v).double().numpy()
    keep = (1.0 - ratio) * x.numel()
    lo, hi, total = 0, bins - 1, hist.sum()
    while lo < hi and total > keep:
        if hist[lo] < hist[hi]:
            total -= hist[lo]
            lo += 1
        else:
            total -= hist[hi]
            hi -= 1
    width = (hi_v - lo_v) / bins
    return lo_v + lo * width, lo_v + (hi + 1) * width


class DensityObserver(Observer):
    """DBDC on every calibration batch, per tensor or per channel (each channel's values on their own); the bounds
    are their mean over the batches (as PTQ4SR)."""

    def __init__(self, ratio: float = 1e-4, channel_axis: Optional[int] = None):
        self.ratio = ratio
        self.channel_axis = channel_axis
        self.found: List[List[tuple[float, float]]] = []  # per batch, per channel

    def observe(self, x: torch.Tensor) -> None:
        self.found.append([density_clip(row, self.ratio) for row in _as_channels(x, self.channel_axis)])

    def bounds(self, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.found:
            raise RuntimeError("observer saw no data (the module was never called during calibration)")
        lo, hi = torch.tensor(self.found, dtype=torch.float64).mean(dim=0).T  # (channels,) each
        return lo.float(), hi.float()
