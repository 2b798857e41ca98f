"""PTQ4SR (Tu et al., CVPR 2023): density-based dual clipping (DBDC), then pixel-aware calibration (PaC).

From the paper and its released code (facts only): activation bounds come from a 2048-bin histogram of each
calibration batch, whose sparser edge bin is dropped until only (1 - p) of the values remain (both sides, so the
clipping is asymmetric; ``quant/observers.py: density_clip``), averaged over the batches; weights get per-channel
MinMax. PaC then trains only the bounds against the FP network's output (L1, no ground truth): first the
activation bounds (Adam, lr 5e-3 cosine to 2e-3), then the weight bounds (5e-6 cosine to 2e-6), 250 updates each,
batch 2, 48x48 LR crops at x4. The released code's feature term is detached (it trains nothing), so only the L1
is used here; the code's lower DBDC bound sits one bin right of the kept range, here it is the kept range's edge.

Adapted: the calibration crops are the ones every method here uses (``calib``), and the placement is the arch's
(PTQ4SR keeps first/last convs at 8 bits; our presets keep them FP). The loop is ``engine/loop.py``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from condiquant.engine.loop import Phase, train_loop
from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import output_loss
from condiquant.quant.attach import named_quantizers, weight_quantizer_inputs
from condiquant.quant.calibrate import ObserverSpec, init_weight_bounds


def dbdc(ctx: PTQContext) -> nn.Module:
    """Quantized copy with DBDC activation bounds and per-channel (per the granularity) MinMax weight bounds."""
    model = ctx.quantized_copy()
    if ctx.resume is None:
        ctx.init_bounds(model, "dbdc")
        init_weight_bounds(model, ObserverSpec("minmax"))
    return model


def run(ctx: PTQContext) -> nn.Module:
    opt = ctx.opts.pac
    model = dbdc(ctx)
    weights = {n for n, _, _ in weight_quantizer_inputs(model)}
    acts = [p for n, q in named_quantizers(model) if n not in weights for p in q.parameters()]
    wts = [p for n, q in named_quantizers(model) if n in weights for p in q.parameters()]
    half = opt.total_iter // 2

    def factor(g: int, it: int) -> float:  # cosine from 1 to end_factor within each phase; weights at their lr
        t = (it - 1 - g * half) / half
        cos = opt.end_factor + (1 - opt.end_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return cos * (opt.weight_lr / opt.lr if g == 1 else 1.0)

    phase = Phase([acts, wts], {}, active=lambda it: 0 if it <= half else 1, lr_factor=factor,
                  labels=("activation bounds", "weight bounds"))
    teacher, r = ctx.fp_model, ctx.input_range

    def loss_fn(lq):
        target = teacher(lq).detach() / r
        loss = output_loss(model(lq) / r, target, "paper")
        return loss, {"l1": loss.item()}

    return train_loop(model, ctx, opt, phase, loss_fn, "PaC")
