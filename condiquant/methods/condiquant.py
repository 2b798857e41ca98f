"""CondiQuant (Liu et al., arXiv 2502.15478), reconstructed: weight conditioning, then 2DQuant (DOBI + DQC).

``conditioning.passes`` run in order on a copy of the FP model: ``prox`` (CondiQuant's condition-number proximal
gradient, ``condiquant/transforms/conditioning.py``), ``rotate`` (orthogonal transforms, exact in float,
``condiquant/transforms/rotation.py``) and/or ``noise_aware`` (least-squares fit to the quantized input,
``condiquant/transforms/noise_aware.py``; it needs activation bounds, so the copy is quantized and
DOBI-initialised first). After ``rotate`` the later passes read their FP layer inputs from the rotated network
(the same function, its layers taking rotated inputs), so the passes compose; whatever runs after the network is
quantized refits the weight bounds of the layers it changed; ``bound_init.bias_correction`` runs after the last
pass. The quantized checkpoint simply holds the new weights (and rotations); DQC distils against the original FP
model. On resume the passes are skipped: the training state holds the full state dict, new weights and rotations
included.
"""
from __future__ import annotations

import copy

import numpy as np
import torch.nn as nn

from condiquant.engine.state import read_state
from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import distill
from condiquant.transforms.conditioning import condition_model, conditioning_layers
from condiquant.transforms.noise_aware import correct_model
from condiquant.transforms.rotation import restore_rotations, rotate_model


def conditioned_quantized(ctx: PTQContext) -> nn.Module:
    """A quantized copy of ``ctx.fp_model`` after the conditioning passes, all bounds initialised (DOBI; dual-region
    inputs get their own observer). On resume: the quantized copy (rotated layers where the state has rotations),
    to be restored from the state."""
    if ctx.resume is not None:
        ctx.logger.info("resume: conditioning skipped, the training state restores the conditioned weights")
        model = copy.deepcopy(ctx.fp_model)
        restore_rotations(model, read_state(ctx.resume)["params"])
        return ctx.quantize(model)
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
    reference = ctx.fp_model  # where the passes read FP layer inputs: the FP network, rotated once rotate ran
    quantized = False
    for step in c.passes:
        if step == "prox":
            condition_model(model, c, calib, holdout, layers, ctx.input_range, ctx.logger, ctx.exp_dir,
                            source=reference)
            if quantized:
                ctx.init_weight_bounds(model, layers)
            continue
        if step == "rotate":  # options.py keeps it before noise_aware, so the network is still FP
            r = c.rotate
            crops = ctx.calib.random_crops(r.num_patches, r.patch_size, np.random.default_rng(r.seed)).to(ctx.device)
            rotate_model(model, ctx.quant, r, crops, holdout, ctx.input_range, ctx.logger, ctx.exp_dir)
            reference = copy.deepcopy(model)  # exact: same function, but its layers now take rotated inputs
            continue
        if not quantized:
            ctx.init_bounds(ctx.quantize(model), "dobi")
            quantized = True
        correct_model(model, reference, layers, c, calib, holdout, ctx.input_range,
                      lambda name: ctx.init_weight_bounds(model, [name]), ctx.logger, ctx.exp_dir)
    if not quantized:
        ctx.init_bounds(ctx.quantize(model), "dobi")
    return model


def run(ctx: PTQContext) -> nn.Module:
    model = conditioned_quantized(ctx)
    if ctx.resume is None:  # after every pass, weights and bounds final; on resume the state holds the biases
        ctx.correct_biases(model)
    return distill(model, ctx)
