"""Bound initialisation: observers watch FP weights and FP activations, then set every quantizer's range.

Activation ranges are fitted in one pass with all quantizers passing their input through unquantized
(2DQuant's protocol), so each range reflects the FP distribution of its input.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from condiquant.quant.attach import named_quantizers, weight_quantizer_inputs
from condiquant.quant.dual_region import DualRegionObserver, DualRegionQuantizer
from condiquant.quant.log2 import Log2Quantizer
from condiquant.quant.observers import DensityObserver, DOBIObserver, MinMaxObserver, PercentileObserver
from condiquant.quant.patterns import matches
from condiquant.quant.quantizer import Observer, SymmetricQuantizer, UniformQuantizer
from condiquant.quant.twin import TwinUniformQuantizer


@dataclass
class ObserverSpec:
    """Which observer to build, with its settings (from YAML ``bound_init``)."""

    kind: str  # minmax | percentile | dobi | dbdc
    percentile: float = 99.99
    dobi_steps: int = 100
    max_samples: int = 1 << 20
    seed: int = 0
    density_ratio: float = 1e-4  # dbdc: the share of values clipped (PTQ4SR: 1e-4, and 1e-5 at 8 bits)
    density_ratio_8bit: float = 1e-5

    def build(self, q: UniformQuantizer, one_direction: bool) -> Observer:
        """The observer of ``kind``; dual-region quantizers always get OAQ's min/max + |x|-percentile one. Symmetric
        grids get DOBI's symmetric search; the other observers' ranges are covered by the quantizer's grid."""
        if isinstance(q, DualRegionQuantizer):
            return DualRegionObserver(q.bp_percentile, q.init, max_samples=self.max_samples, seed=self.seed)
        if isinstance(q, (Log2Quantizer, TwinUniformQuantizer)):  # scales from the extremes (RepQ-ViT, PTQ4ViT)
            return MinMaxObserver()
        axis = q.channel_axis
        if self.kind == "minmax":
            return MinMaxObserver(axis)
        if self.kind == "percentile":
            return PercentileObserver(self.percentile, channel_axis=axis, max_samples=self.max_samples,
                                      seed=self.seed)
        if self.kind == "dbdc":
            return DensityObserver(self.density_ratio_8bit if q.n_bits >= 8 else self.density_ratio, axis)
        if self.kind == "dobi":
            return DOBIObserver(self.dobi_steps, one_direction, isinstance(q, SymmetricQuantizer), channel_axis=axis,
                                max_samples=self.max_samples, seed=self.seed)
        raise ValueError(f"unknown observer {self.kind!r}")


@contextmanager
def observing(quantizers: Dict[str, UniformQuantizer],
              make: Callable[[str, UniformQuantizer], Observer]) -> Iterator[Dict[str, Observer]]:
    """Attach observers for the duration of the block; they are removed even on error."""
    observers = {name: make(name, q) for name, q in quantizers.items()}
    for name, q in quantizers.items():
        q.observer = observers[name]
    try:
        yield observers
    finally:
        for q in quantizers.values():
            q.observer = None


@torch.no_grad()
def init_bounds(model: nn.Module, batches: Iterable[torch.Tensor], spec: ObserverSpec,
                one_direction_patterns: Iterable[str] = (), input_range: float = 1.0) -> int:
    """Set the bounds of every quantizer of ``model``; returns how many were initialised.

    ``batches`` are LR input batches in 0..1 (the model's ``input_range`` scaling is applied here).
    """
    patterns = list(one_direction_patterns)

    def make(name: str, q: UniformQuantizer) -> Observer:
        return spec.build(q, matches(name, patterns))

    weights = list(weight_quantizer_inputs(model))
    weight_names = {name for name, _, _ in weights}
    acts = {n: q for n, q in named_quantizers(model) if n not in weight_names}
    # Activation ranges are fitted on the FP network: weight quantizers pass through during this pass.
    for _, q, _ in weights:
        q.enabled = False
    try:
        with observing(acts, make) as observers:
            for batch in tqdm(batches, desc="calibration forward", leave=False):
                model(batch * input_range)
    finally:
        for _, q, _ in weights:
            q.enabled = True
    for name, q in tqdm(acts.items(), desc=f"{spec.kind} activation bounds", leave=False):
        q.set_bounds(*observers[name].bounds(q.n_bits))
        if isinstance(q, DualRegionQuantizer):
            q.set_breakpoint(observers[name].breakpoint())
    init_weight_bounds(model, spec, patterns)
    return len(weights) + len(acts)


@torch.no_grad()
def init_weight_bounds(model: nn.Module, spec: ObserverSpec, one_direction_patterns: Iterable[str] = (),
                       modules: Iterable[str] | None = None) -> None:
    """Set the bounds of the weight quantizers (of the named ``modules``, or all) from the current weights; needs
    no data, so a pass that changes weights after calibration refits them cheaply."""
    patterns = list(one_direction_patterns)
    prefixes = None if modules is None else tuple(f"{m}.weight_quantizers." for m in modules)
    weights = [t for t in weight_quantizer_inputs(model) if prefixes is None or t[0].startswith(prefixes)]
    for name, q, w in tqdm(weights, desc=f"{spec.kind} weight bounds", leave=False, disable=modules is not None):
        obs = spec.build(q, matches(name, patterns))
        obs.observe(w.detach())
        q.set_bounds(*obs.bounds(q.n_bits))
