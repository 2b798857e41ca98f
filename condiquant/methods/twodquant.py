"""2DQuant (Liu et al., NeurIPS 2024): DOBI bound initialisation, then DQC bound distillation."""
from __future__ import annotations

import torch.nn as nn

from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import distill


def run(ctx: PTQContext) -> nn.Module:
    model = ctx.quantized_copy()
    if ctx.resume is None:  # on resume the training state holds the bounds and the corrected biases
        ctx.init_bounds(model, "dobi")
        ctx.correct_biases(model)
    return distill(model, ctx)
