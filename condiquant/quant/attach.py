"""Attach quantizers to a float model by config (module type + name patterns), never by editing arch code."""
from __future__ import annotations

from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from condiquant.archs.ops import MatMul
from condiquant.options import QuantOptions
from condiquant.quant.dual_region import DualRegionQuantizer
from condiquant.quant.hadamard import to_hadamard
from condiquant.quant.log2 import Log2Quantizer
from condiquant.quant.modules import (ActQuantizerFactory, QuantConv2d, QuantLinear, QuantMatMul, QuantModule,
                                      input_transform)
from condiquant.quant.patterns import matches
from condiquant.quant.quantizer import SymmetricQuantizer, UniformQuantizer
from condiquant.quant.twin import TwinUniformQuantizer

_KINDS = {nn.Linear: "Linear", nn.Conv2d: "Conv2d", MatMul: "MatMul"}


def _kind(module: nn.Module) -> Optional[str]:
    """Exact types only, so a subclass with its own forward (EMT's MeanShift) is never silently replaced;
    Linear/Conv2d subclasses that declare their pre-transform as ``transform_input`` are safe to replace."""
    if input_transform(module) is not None:
        if isinstance(module, nn.Conv2d):
            return "Conv2d"
        if isinstance(module, nn.Linear):
            return "Linear"
    return _KINDS.get(type(module))


class Selected(NamedTuple):
    name: str
    module: nn.Module
    kind: str  # Linear | Conv2d | MatMul
    splits: int  # output chunks with their own quantizers (3 for a split qkv Linear, else 1)


def select_modules(model: nn.Module, quant: QuantOptions) -> List[Selected]:
    """The modules the placement quantizes, in ``named_modules`` order.

    ``quant.placement`` must be resolved (no ``None`` fields).
    """
    place = quant.placement
    selected = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or kind not in place.targets:
            continue
        if not matches(name, place.include) or matches(name, place.skip):
            continue
        splits = 3 if kind == "Linear" and matches(name, place.split_qkv) else 1
        selected.append(Selected(name, module, kind, splits))
    return selected


def act_quantizer_factory(quant: QuantOptions) -> ActQuantizerFactory:
    """The input quantizer of Linear/Conv2d layers that ``quant.a_quantizer`` asks for."""
    if quant.a_quantizer == "dual_region":
        d = quant.dual_region
        return lambda bits: DualRegionQuantizer(bits, d.levels, d.bp_percentile, d.init)
    return UniformQuantizer


def attach_quantizers(model: nn.Module, quant: QuantOptions) -> List[str]:
    """Replace the modules :func:`select_modules` picks, in place, with quantized ones; returns their names."""
    place = quant.placement
    per_channel = quant.w_granularity == "channel"
    make_act = act_quantizer_factory(quant)
    replaced = []
    for name, module, kind, splits in select_modules(model, quant):
        high = matches(name, place.high_precision)
        w_bits = place.high_precision_bit if high else quant.w_bit
        a_bits = place.high_precision_bit if high else quant.a_bit
        act = make_act
        if quant.post_act_quantizer == "twin" and matches(f"{name}.input_quantizers.0", place.one_direction):
            act = lambda bits: TwinUniformQuantizer(bits, "activation")  # noqa: E731
        if kind == "Linear":
            new: nn.Module = QuantLinear(module, w_bits, a_bits, per_channel, splits, act)
        elif kind == "Conv2d":
            new = QuantConv2d(module, w_bits, a_bits, per_channel, act)
        else:
            make_a: ActQuantizerFactory = UniformQuantizer
            if quant.softmax_quantizer != "uniform" and matches(f"{name}.quant_a", place.post_softmax):
                make_a = (Log2Quantizer if quant.softmax_quantizer == "log2"
                          else lambda bits: TwinUniformQuantizer(bits, "softmax"))
            new = QuantMatMul(module, a_bits, make_a)
        if quant.w_symmetric and kind != "MatMul":
            new.weight_quantizers = nn.ModuleList(SymmetricQuantizer(q.n_bits, q.upper.numel(), q.channel_axis)
                                                  for q in new.weight_quantizers)
        if quant.noisy_bias and kind != "MatMul" and a_bits:
            new.enable_noisy_bias(module.in_features if kind == "Linear" else module.in_channels)
        if quant.hadamard:
            to_hadamard(new, kind, clamp_codes=quant.hadamard_codes == "clamped")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return replaced


def named_quantizers(model: nn.Module) -> Iterator[Tuple[str, UniformQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer):
            yield name, module


def weight_quantizer_inputs(model: nn.Module) -> Iterator[Tuple[str, UniformQuantizer, nn.Parameter]]:
    """(name, quantizer, weight slice) for every weight quantizer; the slice is what it quantizes."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)) and len(module.weight_quantizers):
            chunks = module.weight.chunk(len(module.weight_quantizers), dim=0)
            for i, (q, w) in enumerate(zip(module.weight_quantizers, chunks)):
                yield f"{name}.weight_quantizers.{i}", q, w


def quant_modules(model: nn.Module) -> Iterator[Tuple[str, QuantModule]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            yield name, module


def bound_parameters(model: nn.Module) -> List[nn.Parameter]:
    """All learnable quantizer parameters (what DQC trains): bounds, and dual-region breakpoints."""
    return [p for _, q in named_quantizers(model) for p in q.parameters()]


def step_scales(model: nn.Module, lr_scale: str, act_factor: float) -> Dict[int, torch.Tensor]:
    """id(parameter) -> factor on the optimizer's step for each element: its quantizer's current range (u - l),
    per channel where the bounds are, for ``lr_scale: range`` (else 1), times ``act_factor`` for the parameters
    of activation quantizers."""
    weights = {name for name, _, _ in weight_quantizer_inputs(model)}
    scales: Dict[int, torch.Tensor] = {}
    for name, q in named_quantizers(model):
        r = (q.upper - q.lower).detach().abs() if lr_scale == "range" else torch.ones_like(q.lower.detach())
        r = r * (1.0 if name in weights else act_factor)
        for p in q.parameters():
            scales[id(p)] = r if p.shape == r.shape else r.max().reshape(p.shape)
    return scales


@torch.no_grad()
def freeze_weights(model: nn.Module) -> nn.Module:
    """Inference: store every quantized weight on its grid once and switch its weight quantizers off, so a forward
    no longer re-quantizes constant weights. Outputs are bit-identical (the layer convolves the same tensor)."""
    for _, module in quant_modules(model):
        qs = getattr(module, "weight_quantizers", None)
        if not qs or not all(bool(q.initialized) and q.enabled for q in qs):
            continue
        chunks = module.weight.chunk(len(qs), dim=0)
        module.weight.copy_(torch.cat([q(w) for q, w in zip(qs, chunks)], dim=0))
        for q in qs:
            q.enabled = False
    return model


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for _, q in named_quantizers(model):
        q.enabled = enabled
