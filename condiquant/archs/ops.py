"""Small modules shared by the archs.

Attention matrix products are modules (not a bare ``@``) so that quantizers can attach to their inputs by type.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MatMul(nn.Module):
    """``a @ b`` as a module; its two inputs are the activations a quantizer sees.

    ``gram=True`` declares ``b`` to be ``a.transpose(-2, -1)`` (EMT's ``q q^T``): one tensor, so a quantized
    model must put it on one grid (``QuantMatMul`` then has a single quantizer).
    """

    def __init__(self, gram: bool = False):
        super().__init__()
        self.gram = gram

    def extra_repr(self) -> str:
        return "gram=True" if self.gram else ""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b
