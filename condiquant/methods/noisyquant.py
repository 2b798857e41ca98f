"""NoisyQuant (Liu et al., CVPR 2023; CondiQuant's Table 3 baseline): DOBI bounds, then a fixed noisy bias on the
input of every quantized Linear/Conv2d, removed again behind the layer (``QuantModule.noisy_bias``), no training.

The paper's point: adding a fixed uniform noise n ~ U(-s/2, s/2) before quantizing an activation with a heavy-
tailed distribution, and subtracting its (exactly known) effect W n after the layer, turns the quantization error
into one that averages out over the reduction axis. Here n has one value per input channel (constant over
space, so a conv's correction is the conv of a constant image: exact with zero padding), sampled once with the
run's seed; its amplitude a (n ~ U(-a s/2, a s/2), s the input quantizer's step) is chosen per layer from
``noisyquant.amplitudes`` by the layer's output error on calibration crops (FP input, quantized layer vs FP layer),
0 included, so a layer is never made worse on that data. Adapted to SR archs: the paper treats ViT linear layers
(post-GELU fc2 inputs); here every quantized Linear/Conv2d input, EMT's 1x1 convs and IMDN's 3x3 convs alike.
"""
from __future__ import annotations

import json
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from condiquant.methods.context import PTQContext
from condiquant.quant.attach import quant_modules
from condiquant.transforms.conditioning import forward_with_input_hooks


def _layer_inputs(model: nn.Module, names: List[str], batches: List[torch.Tensor],
                  input_range: float) -> Dict[str, torch.Tensor]:
    """The inputs each named module sees on ``batches`` (concatenated over the batch axis)."""
    seen: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    forward_with_input_hooks(model, [(model.get_submodule(n), lambda _m, x, n=n: seen[n].append(x.detach()))
                                     for n in names], batches, input_range)
    return {n: torch.cat(v) for n, v in seen.items() if v}


@torch.no_grad()
def choose_noise(layer: nn.Module, fp_layer: nn.Module, x: torch.Tensor, amplitudes: List[float],
                 generator: torch.Generator) -> Dict[str, float]:
    """Set ``layer.noisy_bias`` to the amplitude with the smallest output error on ``x``; returns the errors."""
    q = layer.input_quantizers[0]
    step = float((q.upper - q.lower).max()) / (2 ** q.n_bits - 1)
    unit = torch.rand(layer.noisy_bias.shape, generator=generator, dtype=layer.noisy_bias.dtype) - 0.5
    target = fp_layer(x)
    errors = {}
    for a in amplitudes:
        layer.noisy_bias.copy_(a * step * unit)
        errors[a] = float((layer(x) - target).pow(2).mean())
    best = min(errors, key=errors.get)
    layer.noisy_bias.copy_(best * step * unit)
    return {"amplitude": best, "step": step, "errors": errors}


def run(ctx: PTQContext) -> nn.Module:
    opt = ctx.opts.noisyquant
    model = ctx.quantized_copy()  # quant.noisy_bias (required by TrainOptions) gives the layers their buffers
    ctx.init_bounds(model, "dobi")
    layers = {n: m for n, m in quant_modules(model) if getattr(m, "noisy_bias", None) is not None}
    crops = ctx.calib.random_crops(opt.num_patches, opt.patch_size, np.random.default_rng(ctx.opts.calib.seed))
    inputs = _layer_inputs(ctx.fp_model, list(layers), [crops.to(ctx.device)], ctx.input_range)
    generator = torch.Generator().manual_seed(ctx.opts.manual_seed)
    report = {}
    for name, layer in layers.items():
        report[name] = choose_noise(layer, ctx.fp_model.get_submodule(name), inputs[name], opt.amplitudes, generator)
    chosen = [r["amplitude"] for r in report.values()]
    ctx.logger.info("NoisyQuant: %d layers, amplitude per layer: %s", len(report),
                    ", ".join(f"{a:g} x{chosen.count(a)}" for a in sorted(set(chosen))))
    (ctx.exp_dir / "noisyquant.json").write_text(json.dumps(report, indent=1))
    return model
