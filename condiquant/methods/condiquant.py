"""CondiQuant (Liu et al., arXiv 2502.15478), reconstructed: weight conditioning, then 2DQuant (DOBI + DQC).

``conditioning.passes`` run in order on a copy of the FP model: ``prox`` (CondiQuant's condition-number proximal
gradient, ``condiquant/transforms/conditioning.py``) and/or ``noise_aware`` (least-squares fit to the quantized
input, ``condiquant/transforms/noise_aware.py``; it needs activation bounds, so the copy is quantized and
DOBI-initialised first). Whatever runs after the network is quantized refits the weight bounds of the layers it
changed. The quantized checkpoint simply holds the new weights; DQC distils against the original FP model. On
resume the passes are skipped: the training state holds the full state dict, new weights included.
"""
from __future__ import annotations

import copy

import numpy as np
import torch.nn as nn

from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import distill
from condiquant.transforms.conditioning import condition_model, conditioning_layers
from condiquant.transforms.noise_aware import correct_model


def conditioned_quantized(ctx: PTQContext) -> nn.Module:
    """A quantized copy of ``ctx.fp_model`` after the conditioning passes, all bounds initialised (DOBI; dual-region
    inputs get their own observer). On resume: the plain quantized copy, to be restored from the state."""
    if ctx.resume is not None:
        ctx.logger.info("resume: conditioning skipped, the training state restores the conditioned weights")
        return ctx.quantized_copy()
    c = ctx.opts.conditioning
    seed, chunk = ctx.opts.calib.seed, ctx.opts.calib.chunk_size
    calib = [b.to(ctx.device) for b in
             ctx.calib.random_crops(c.num_patches, c.patch_size, np.random.default_rng(seed)).split(chunk)]
    holdout = [b.to(ctx.device) for b in
               ctx.calib.val_crops(c.holdout_patches, c.patch_size, np.random.default_rng(seed)).split(chunk)]
    layers = conditioning_layers(ctx.fp_model, ctx.quant, c)
    if not layers:
        ctx.logger.warning("conditioning: no quantized %s module matches conditioning.layers", c.targets)
    model = copy.deepcopy(ctx.fp_model)
    quantized = False
    for step in c.passes:
        if step == "prox":
            condition_model(model, c, calib, holdout, layers, ctx.input_range, ctx.logger, ctx.exp_dir,
                            source=ctx.fp_model)
            if quantized:
                ctx.init_weight_bounds(model, layers)
            continue
        if not quantized:
            ctx.init_bounds(ctx.quantize(model), "dobi")
            quantized = True
        correct_model(model, ctx.fp_model, layers, c, calib, holdout, ctx.input_range,
                      lambda name: ctx.init_weight_bounds(model, [name]), ctx.logger, ctx.exp_dir)
    if not quantized:
        ctx.init_bounds(ctx.quantize(model), "dobi")
    return model


def run(ctx: PTQContext) -> nn.Module:
    return distill(conditioned_quantized(ctx), ctx)
