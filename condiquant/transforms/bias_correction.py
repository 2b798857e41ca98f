"""Empirical bias correction of the weight quantization error (Nagel et al., "Data-free quantization through weight
equalization and bias correction", ICCV 2019, §4.2, empirical variant).

Low-bit weight grids need not hold 0 and round many weights of an output channel the same way, so W_q - W has a
non-zero mean effect on each output channel: E[(W_q - W) x] != 0, and a stack of layers accumulates these offsets.
Each quantized Linear/Conv2d with a bias subtracts the mean over crops and positions of
``layer(x; W_q) - layer(x; W)``, x being the layer's input in the network's own float forward (every quantizer off:
for a conditioned or rotated network that is its equivalent FP function). Only weight quantization is corrected;
activation quantizers take no part. Unlike the other passes this one changes the float function on purpose, so it
runs once the bounds are final. The biases are plain parameters: checkpoints, packed files and ONNX export carry it.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn as nn

from condiquant.quant.attach import named_quantizers, quant_modules
from condiquant.transforms.conditioning import forward_with_input_hooks


@torch.no_grad()
def correct_biases(model: nn.Module, batches: Iterable[torch.Tensor], input_range: float = 1.0) -> Dict[str, float]:
    """Correct the biases of ``model``'s weight-quantized layers in place; ``batches`` are LR crops in 0..1.
    Returns, per corrected layer, the largest |shift| applied to its bias (layers without a bias are skipped)."""
    layers = {m: n for n, m in quant_modules(model)
              if getattr(m, "weight_quantizers", None) and getattr(m, "bias", None) is not None}
    quantizers = [q for _, q in named_quantizers(model)]
    states = [q.enabled for q in quantizers]
    sums: Dict[nn.Module, list] = {}
    busy = []  # the hook runs its own module: those calls must not be recorded again

    def record(module: nn.Module, x: torch.Tensor) -> None:
        if busy:
            return
        busy.append(module)
        try:
            reference = module(x)
            for q in module.weight_quantizers:
                q.enabled = True
            delta = (module(x) - reference).double()
        finally:
            for q in module.weight_quantizers:
                q.enabled = False
            busy.pop()
        channel = 1 if delta.dim() == 4 else -1  # conv maps (N, C, H, W); linear tokens (..., C)
        per_channel = delta.movedim(channel, 0).flatten(1)
        total, count = sums.get(module, (0.0, 0))
        sums[module] = [total + per_channel.sum(dim=1), count + per_channel.shape[1]]

    for q in quantizers:
        q.enabled = False
    try:
        forward_with_input_hooks(model, [(m, record) for m in layers], batches, input_range)
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state
    shifts = {}
    for module, (total, count) in sums.items():
        shift = (total / count).to(module.bias.dtype)
        module.bias.sub_(shift)
        shifts[layers[module]] = float(shift.abs().max())
    return shifts
