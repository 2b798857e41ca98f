"""CondiQuant (Liu et al., arXiv 2502.15478), reconstructed: weight conditioning, then 2DQuant (DOBI + DQC).

The conditioning pass (``condiquant/transforms/conditioning.py``) rewrites the weights of an FP copy before the
quantizers are attached, so the quantized checkpoint simply holds the conditioned weights. DQC distils against
the original FP model. On resume the pass is skipped: the training state holds the full state dict, conditioned
weights included, and loading it restores them exactly.
"""
from __future__ import annotations

import copy

import numpy as np
import torch.nn as nn

from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import distill
from condiquant.transforms.conditioning import condition_model, conditioning_layers


def conditioned_copy(ctx: PTQContext) -> nn.Module:
    """A float copy of ``ctx.fp_model`` with conditioned weights (left as is on resume: the state restores them)."""
    model = copy.deepcopy(ctx.fp_model)
    if ctx.resume is None:
        c = ctx.opts.conditioning
        seed = ctx.opts.calib.seed
        calib = ctx.calib.random_crops(c.num_patches, c.patch_size, np.random.default_rng(seed))
        holdout = ctx.calib.val_crops(c.holdout_patches, c.patch_size, np.random.default_rng(seed))
        chunk = ctx.opts.calib.chunk_size
        layers = conditioning_layers(model, ctx.quant, c)
        if not layers:
            ctx.logger.warning("conditioning: no quantized %s module matches conditioning.layers", c.targets)
        condition_model(model, c, [b.to(ctx.device) for b in calib.split(chunk)],
                        [b.to(ctx.device) for b in holdout.split(chunk)], layers, ctx.input_range, ctx.logger,
                        ctx.exp_dir)
    else:
        ctx.logger.info("resume: conditioning skipped, the training state restores the conditioned weights")
    return model


def run(ctx: PTQContext) -> nn.Module:
    model = ctx.quantize(conditioned_copy(ctx))
    if ctx.resume is None:
        ctx.init_bounds(model, "dobi")
    return distill(model, ctx, ctx.resume)
