"""Small modules shared by the archs.

Attention matrix products are modules (not a bare ``@``) so that quantizers can attach to their inputs by type.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MatMul(nn.Module):
    """``a @ b`` as a module; its two inputs are the activations a quantizer sees."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b
