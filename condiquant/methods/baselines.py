"""Range-only PTQ baselines: bounds from one observer, no training (2DQuant Table 3's MinMax/Percentile/DOBI)."""
from __future__ import annotations

import torch.nn as nn

from condiquant.methods.context import PTQContext


def _observer_only(ctx: PTQContext, observer: str) -> nn.Module:
    model = ctx.quantized_copy()
    ctx.init_bounds(model, observer)
    ctx.correct_biases(model)
    return model


def minmax(ctx: PTQContext) -> nn.Module:
    return _observer_only(ctx, "minmax")


def percentile(ctx: PTQContext) -> nn.Module:
    return _observer_only(ctx, "percentile")


def dobi(ctx: PTQContext) -> nn.Module:
    return _observer_only(ctx, "dobi")
