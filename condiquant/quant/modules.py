"""Quantized drop-in replacements: Linear/Conv2d (weight + input quantizers) and MatMul (both inputs).

They keep the float module's parameter names (``weight``, ``bias``), so a quantized checkpoint is the FP state
dict plus quantizer bounds. Biases stay FP. A Linear may be split along its outputs into equal chunks with
independent weight and input quantizers each (2DQuant quantizes SwinIR's fused qkv as separate q, k, v).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.archs.ops import MatMul
from condiquant.quant.quantizer import UniformQuantizer


# Builds the input quantizer of a Linear/Conv2d from its bit-width (uniform, or dual-region for OAQ).
ActQuantizerFactory = Callable[[int], UniformQuantizer]


def _act_quantizers(n: int, a_bits: Optional[int], make: ActQuantizerFactory) -> nn.ModuleList:
    return nn.ModuleList([make(a_bits) for _ in range(n)] if a_bits else [])


def _weight_quantizers(n: int, w_bits: Optional[int], channels: int, per_channel: bool) -> nn.ModuleList:
    if not w_bits:
        return nn.ModuleList()
    if per_channel:
        return nn.ModuleList([UniformQuantizer(w_bits, channels, channel_axis=0) for _ in range(n)])
    return nn.ModuleList([UniformQuantizer(w_bits) for _ in range(n)])


InputTransform = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def input_transform(module: nn.Module) -> Optional[InputTransform]:
    """The fixed pre-transform a Linear/Conv2d subclass applies to its input before its weight multiplies it
    (EMT's shifted 1x1, a rotation), declared as the method ``transform_input``; None for plain layers. It may read
    only the module's buffers and ``in_channels``/``in_features``, which the quantized replacements keep."""
    fn = getattr(type(module), "transform_input", None)
    return fn if callable(fn) else None


def _keep_buffers(dst: nn.Module, src: nn.Module) -> None:
    for name, buf in src.named_buffers(recurse=False):
        dst.register_buffer(name, buf)


class QuantModule(nn.Module):
    """Base of the modules whose quantizers the calibration and training loops drive.

    A Linear/Conv2d may carry a fixed ``noisy_bias`` n (NoisyQuant, one value per input channel): its input is
    quantized as Q(x + n) and layer(n) is subtracted from the output, so without quantization the layer computes
    exactly what it did (for a conv the subtracted term is the conv of the constant n image, zero padding
    included, hence exact at the borders too)."""

    noisy_bias: Optional[torch.Tensor]

    def quantizers(self) -> Iterator[UniformQuantizer]:
        return (m for m in self.modules() if isinstance(m, UniformQuantizer))

    def enable_noisy_bias(self, channels: int) -> None:
        self.noisy_bias = torch.zeros(channels, device=self.weight.device)


class QuantLinear(QuantModule):
    def __init__(self, src: nn.Linear, w_bits: Optional[int], a_bits: Optional[int], per_channel: bool = False,
                 splits: int = 1, act_quantizer: ActQuantizerFactory = UniformQuantizer):
        super().__init__()
        if src.out_features % splits:
            raise ValueError(f"cannot split {src.out_features} outputs into {splits} equal parts")
        self.in_features, self.out_features, self.splits = src.in_features, src.out_features, splits
        self.weight, self.bias = src.weight, src.bias
        self._transform = input_transform(src)
        _keep_buffers(self, src)
        chunk = src.out_features // splits
        self.weight_quantizers = _weight_quantizers(splits, w_bits, chunk, per_channel)
        self.input_quantizers = _act_quantizers(splits, a_bits, act_quantizer)
        self.register_buffer("noisy_bias", None)  # NoisyQuant sets it (QuantModule)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, splits={self.splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._transform is not None:
            x = self._transform(self, x)
        weights = self.weight.chunk(self.splits, dim=0)
        biases = self.bias.chunk(self.splits) if self.bias is not None else [None] * self.splits
        noisy = x + self.noisy_bias if self.noisy_bias is not None else x
        outs = []
        for i in range(self.splits):
            xi = self.input_quantizers[i](noisy) if self.input_quantizers else noisy
            wi = self.weight_quantizers[i](weights[i]) if self.weight_quantizers else weights[i]
            out = F.linear(xi, wi, biases[i])
            outs.append(out - F.linear(self.noisy_bias, wi) if self.noisy_bias is not None else out)
        return outs[0] if self.splits == 1 else torch.cat(outs, dim=-1)


class QuantConv2d(QuantModule):
    """Quantized Conv2d (Linear alike): a subclass's ``transform_input`` pre-transform is kept (its buffers are
    re-registered under the same names) and the input quantizer sees the transformed input."""

    def __init__(self, src: nn.Conv2d, w_bits: Optional[int], a_bits: Optional[int], per_channel: bool = False,
                 act_quantizer: ActQuantizerFactory = UniformQuantizer):
        super().__init__()
        if src.padding_mode != "zeros":
            raise ValueError(f"padding_mode {src.padding_mode!r} is not supported")
        self.conv_args = dict(stride=src.stride, padding=src.padding, dilation=src.dilation, groups=src.groups)
        self.in_channels = src.in_channels
        self.weight, self.bias = src.weight, src.bias
        self._transform = input_transform(src)
        _keep_buffers(self, src)
        self.weight_quantizers = _weight_quantizers(1, w_bits, src.out_channels, per_channel)
        self.input_quantizers = _act_quantizers(1, a_bits, act_quantizer)
        self.register_buffer("noisy_bias", None)  # NoisyQuant sets it (QuantModule)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, {self.conv_args}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._transform is not None:
            x = self._transform(self, x)
        noise = self.noisy_bias.view(1, -1, 1, 1).expand_as(x) if self.noisy_bias is not None else None
        if noise is not None:
            x = x + noise
        if self.input_quantizers:
            x = self.input_quantizers[0](x)
        w = self.weight_quantizers[0](self.weight) if self.weight_quantizers else self.weight
        out = F.conv2d(x, w, self.bias, **self.conv_args)
        return out - F.conv2d(noise, w, None, **self.conv_args) if noise is not None else out


class QuantMatMul(QuantModule):
    """``a @ b`` with a static per-tensor quantizer on each input (e.g. q and k^T, or softmax(qk) and v); a
    ``gram`` product ``a @ a^T`` has one quantizer, so both operands are the same integer tensor."""

    def __init__(self, src: MatMul, a_bits: int, make_a: ActQuantizerFactory = UniformQuantizer):
        super().__init__()
        self.gram = src.gram
        self.quant_a = make_a(a_bits)
        self.quant_b = None if self.gram else UniformQuantizer(a_bits)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.gram:
            qa = self.quant_a(a)
            return qa @ qa.transpose(-2, -1)
        return self.quant_a(a) @ self.quant_b(b)
