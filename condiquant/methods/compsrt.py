"""CompSRT (Zeinali et al., arXiv 2601.21069), as its code runs: 2DQuant's pipeline (DOBI, then DQC) on quantizers
that rotate every quantized tensor by a Hadamard transform inside the quantizer and learn CompSRT's two grid
scalars (alpha, beta) with the bounds (``condiquant/quant/hadamard.py``, selected by ``quant.hadamard: true``).
Not integer-deployable (the quantizer de-rotates before the product); optional pruning is not reproduced.
"""
from __future__ import annotations

import torch.nn as nn

from condiquant.methods import twodquant
from condiquant.methods.context import PTQContext


def run(ctx: PTQContext) -> nn.Module:
    return twodquant.run(ctx)  # the quantizers carry the method: DQC trains bounds, alpha and beta together
