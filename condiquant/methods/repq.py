"""RepQ-ViT (Li et al., ICCV 2023): scale reparameterisation of post-LayerNorm activations, log√2 post-softmax.

From the paper (facts only): post-LayerNorm activations vary strongly across channels, so they are first given
per-channel quantizers; the per-channel scales and zero points are then folded into the LayerNorm's affine and
the next layer's weights, which leaves one per-tensor quantizer computing exactly the per-channel grid. Post-softmax
maps get a log√2 quantizer (``quant.softmax_quantizer: log2``, ``quant/log2.py``). No training.

The reparameterisation, with per-channel bounds (l_c, u_c), steps s_c = (u_c - l_c) / (2^b - 1), and the
per-tensor step and lower bound s = mean(s_c), l = mean(l_c):
    x' = a x + c,  a_c = s / s_c,  c_c = l - a_c l_c      (so (x'_c - l) / s = (x_c - l_c) / s_c: same codes)
    LayerNorm: gamma' = a gamma, beta' = a beta + c;   next Linear: W' = W diag(1/a), b' = b - W (c / a)
computed in float64 and checked exact on held-out crops (``transforms/equivalence.py``); the consumers' input
quantizers get the bounds [l, l + s (2^b - 1)]. Every other bound is DOBI's.

Adapted to SR archs: the sites are a LayerNorm feeding quantized Linear layers directly (up to token permutations
such as window partitions): SwinIR's norm1 -> attn.qkv and norm2 -> mlp.fc1. EMT (no normalisation before its
sublayers, its BatchNorm feeds a residual sum), IMDN and EDSR have no such site: there RepQ is DOBI with the log√2
post-softmax quantizer (EMT) or plain DOBI (IMDN, EDSR), and the log says so.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from condiquant.methods.context import PTQContext
from condiquant.quant.attach import select_modules
from condiquant.quant.observers import DOBIObserver
from condiquant.quant.patterns import matches
from condiquant.transforms.conditioning import forward_with_input_hooks
from condiquant.transforms.equivalence import check_exact

# arch -> (LayerNorm child, consumer Linear children) of the blocks that hold both
SITES: Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]] = {
    "SwinIR": (("norm1", ("attn.qkv",)), ("norm2", ("mlp.fc1",))),
}

Site = Tuple[str, List[str]]  # (LayerNorm name, consumer Linear names)


def reparam_sites(model: nn.Module, arch: str, quantized: List[str]) -> List[Site]:
    sites = []
    names = dict(model.named_modules())
    for parent in names:
        for norm, consumers in SITES.get(arch, ()):
            n = f"{parent}.{norm}" if parent else norm
            cs = [f"{parent}.{c}" if parent else c for c in consumers]
            if isinstance(names.get(n), nn.LayerNorm) and all(c in quantized for c in cs):
                sites.append((n, cs))
    return sites


def per_channel_bounds(model: nn.Module, sites: List[Site], batches: List[torch.Tensor], input_range: float,
                       bits: Dict[str, int], steps: int, seed: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """DOBI bounds per channel (last axis) of each LayerNorm's FP output on ``batches``, observed at its first
    consumer's input (the same values up to a token permutation such as a window partition)."""
    observers = {n: DOBIObserver(steps, channel_axis=-1, seed=seed) for n, _ in sites}
    forward_with_input_hooks(model, [(model.get_submodule(cs[0]), lambda _m, x, n=n: observers[n].observe(x))
                                     for n, cs in sites], batches, input_range)
    return {n: observers[n].bounds(bits[n]) for n, _ in sites}


@torch.no_grad()
def reparameterise(model: nn.Module, norm: str, consumers: List[str], lower: torch.Tensor, upper: torch.Tensor,
                   bits: int) -> Tuple[float, float]:
    """Fold the per-channel grid (lower, upper) of ``norm``'s output into it and ``consumers`` (float64 model, in
    place); returns the per-tensor (lower, upper) that computes the same codes."""
    levels = 2 ** bits - 1
    lo, hi = lower.double(), upper.double()
    step = ((hi - lo) / levels).clamp_min(1e-12 * float((hi - lo).abs().max()) + 1e-300)  # dead channels
    s, l = float(step.mean()), float(lo.mean())
    a = s / step
    c = l - a * lo
    ln = model.get_submodule(norm)
    ln.weight.copy_(ln.weight * a)
    ln.bias.copy_(ln.bias * a + c)
    for name in consumers:
        lin = model.get_submodule(name)
        w = lin.weight.clone()
        lin.bias.copy_(lin.bias - w @ (c / a))
        lin.weight.copy_(w / a)
    return l, l + s * levels


def run(ctx: PTQContext) -> nn.Module:
    arch = ctx.opts.network_g["type"]
    fp = ctx.fp_model
    sites = reparam_sites(fp, arch, [s.name for s in select_modules(fp, ctx.quant)])
    model = copy.deepcopy(fp)
    per_tensor: Dict[str, Tuple[float, float]] = {}
    if not sites:
        ctx.logger.info("repq: no LayerNorm of %s feeds a quantized layer: no reparameterisation (DOBI%s)", arch,
                        " with the log√2 post-softmax quantizer" if ctx.quant.placement.post_softmax else "")
    else:
        place = ctx.quant.placement
        bits = {n: place.high_precision_bit if matches(cs[0], place.high_precision) else ctx.quant.a_bit
                for n, cs in sites}
        b = ctx.opts.bound_init
        bounds = per_channel_bounds(fp, sites, ctx.calibration_batches(), ctx.input_range, bits, b.dobi_steps,
                                    ctx.opts.calib.seed)
        model64 = copy.deepcopy(fp).double()
        for n, cs in sites:
            per_tensor.update({c: reparameterise(model64, n, cs, *bounds[n], bits[n]) for c in cs})
        holdout = ctx.calib.val_crops(8, ctx.opts.calib.patch_size, np.random.default_rng(ctx.opts.calib.seed)).split(4)
        change = check_exact("repq reparameterisation", fp, model64, holdout, ctx.input_range)
        model = model64.float()
        ctx.logger.info("repq: %d LayerNorm sites reparameterised (held-out output change %.1e in float64)",
                        len(sites), change)
        ctx.summary["repq"] = {"sites": len(sites), "float64_output_change": change}
    ctx.quantize(model)
    ctx.init_bounds(model, "dobi")
    for name, (lo, hi) in per_tensor.items():
        for q in model.get_submodule(name).input_quantizers:
            q.set_bounds(torch.tensor(lo), torch.tensor(hi))
    return model
