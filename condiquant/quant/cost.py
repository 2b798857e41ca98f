"""Model size and operation counts of a quantized SR network, computed from the float model's shapes.

**Storage.** P counts every ``nn.Parameter`` of the model (trainable or not; buffers such as BatchNorm statistics,
attention masks and index tables are not counted). SwinIR's ``relative_position_bias_table`` parameters are left
out by default, as in 2DQuant's P = 897,228 for SwinIR-light x4 (``include_position_bias=True`` counts them).
Q counts the weights of the Linear/Conv2d layers the placement gives a weight quantizer, each at ``w_bit`` (or
``high_precision_bit`` for high-precision layers); biases, quantizer bounds and all other parameters stay 32-bit.
ratio = 32 P / (32 (P - Q) + sum_i b_i Q_i).

**Ops.** Multiply-accumulates per layer, recorded by forward hooks during one forward pass of a (1, C, H, W) LR
input on the meta device (every shape is real, no arithmetic is done): Linear rows x in x out; Conv2d out_pixels x
out_ch x in_ch / groups x k_h x k_w; MatMul (attention products) rows x inner x columns from its operands.
'other' is one op per output element of the normalisation layers (LayerNorm, BatchNorm, GroupNorm), the way
SwinIR's ``flops()`` counts LayerNorm. Activations, softmax, residual adds, padding, pixel shuffles and EMT's fixed
channel shifts are not counted.

**Speed-up**, 2DQuant's definition (paper Table 1, §2.7 of docs/papers.md): total ops / (ops of quantized layers x
b / 32 + all other ops at full cost). It is a theoretical ratio, not a latency. b is the layer's bit-width,
max(w_bit, a_bit) for Linear/Conv2d (the wider operand sets the arithmetic width) and a_bit for MatMul.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from condiquant.archs.ops import MatMul
from condiquant.archs.swinir_arch import SwinIR
from condiquant.options import QuantOptions
from condiquant.quant.attach import select_modules
from condiquant.quant.modules import QuantModule
from condiquant.quant.patterns import matches

KINDS = ("Linear", "MatMul", "Conv2d", "other")
_POSITION_BIAS = "**relative_position_bias_table"
_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclass(frozen=True)
class LayerOps:
    name: str
    kind: str  # one of KINDS
    ops: int  # multiply-accumulates; for 'other', output elements
    bits: Optional[int]  # bit-width the layer computes at when quantized; None = full precision


@dataclass(frozen=True)
class StorageCost:
    params: int  # P
    quantized_params: int  # Q
    quantized_bits: int  # sum_i b_i Q_i

    @property
    def fp_bits(self) -> int:
        return 32 * self.params

    @property
    def bits(self) -> int:
        return 32 * (self.params - self.quantized_params) + self.quantized_bits

    @property
    def ratio(self) -> float:
        return self.fp_bits / self.bits


@dataclass(frozen=True)
class OpsCost:
    layers: Tuple[LayerOps, ...]
    lr_size: Tuple[int, int]

    def by_kind(self, quantized_only: bool = False) -> Dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for layer in self.layers:
            if layer.bits is not None or not quantized_only:
                out[layer.kind] += layer.ops
        return out

    @property
    def total(self) -> int:
        return sum(layer.ops for layer in self.layers)

    @property
    def effective(self) -> float:
        """Quantized ops scaled by b / 32, the rest at full cost (2DQuant's speed-up denominator)."""
        return sum(layer.ops * layer.bits / 32 if layer.bits else layer.ops for layer in self.layers)

    @property
    def speedup(self) -> float:
        return self.total / self.effective


def _reject_quantized(model: nn.Module) -> None:
    if any(isinstance(m, QuantModule) for m in model.modules()):
        raise ValueError("cost is computed from the float model; this one already has quantizers attached")


def count_parameters(model: nn.Module, include_position_bias: bool = False) -> int:
    """P: every parameter, without SwinIR's relative-position-bias tables unless asked."""
    return sum(p.numel() for name, p in model.named_parameters()
               if include_position_bias or not matches(name, [_POSITION_BIAS]))


def quantized_weights(model: nn.Module, quant: QuantOptions) -> List[Tuple[str, int, int]]:
    """(layer, weight count, bits) of every weight the placement quantizes; ``quant.placement`` resolved."""
    place = quant.placement
    high_bits = place.high_precision_bit
    return [(s.name, s.module.weight.numel(), high_bits if matches(s.name, place.high_precision) else quant.w_bit)
            for s in select_modules(model, quant) if s.kind != "MatMul"]


def storage_cost(model: nn.Module, quant: QuantOptions, include_position_bias: bool = False) -> StorageCost:
    _reject_quantized(model)
    weights = quantized_weights(model, quant)
    return StorageCost(count_parameters(model, include_position_bias), sum(n for _, n, _ in weights),
                       sum(n * b for _, n, b in weights))


def _layer_bits(model: nn.Module, quant: QuantOptions) -> Dict[str, int]:
    place = quant.placement
    bits = {}
    for s in select_modules(model, quant):
        w, a = (place.high_precision_bit,) * 2 if matches(s.name, place.high_precision) else (quant.w_bit, quant.a_bit)
        bits[s.name] = a if s.kind == "MatMul" else max(w, a)
    return bits


def _module_ops(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> Optional[Tuple[str, int]]:
    if isinstance(module, nn.Linear):
        return "Linear", output.numel() * module.in_features
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return "Conv2d", output.numel() * module.in_channels // module.groups * kh * kw
    if isinstance(module, MatMul):
        return "MatMul", output.numel() * inputs[0].shape[-1]
    if isinstance(module, _NORMS):
        return "other", output.numel()
    return None


def measure_ops(model: nn.Module, quant: QuantOptions, lr_size: Sequence[int], in_channels: int = 3) -> OpsCost:
    """Per-layer ops of one forward pass on a (1, in_channels, H, W) input; ``quant.placement`` resolved.

    The pass runs on a meta-device copy, so it costs no arithmetic and leaves ``model`` untouched. A module called
    several times accumulates its ops.
    """
    _reject_quantized(model)
    h, w = lr_size
    bits = _layer_bits(model, quant)
    shadow = copy.deepcopy(model).to("meta").eval()
    found: Dict[str, List] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            counted = _module_ops(module, inputs, output)
            if counted is not None:
                found.setdefault(name, [counted[0], 0])[1] += counted[1]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in shadow.named_modules()]
    try:
        with torch.no_grad():
            shadow(torch.zeros(1, in_channels, h, w, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    layers = tuple(LayerOps(name, kind, ops, bits.get(name)) for name, (kind, ops) in found.items())
    return OpsCost(layers, (h, w))


def twodquant_supported(model: nn.Module) -> bool:
    """2DQuant's counting code exists for SwinIR with the one-conv residuals and the direct pixel-shuffle upsampler."""
    return (isinstance(model, SwinIR) and model.upsampler == "pixelshuffledirect"
            and isinstance(model.conv_after_body, nn.Conv2d))


def twodquant_ops(model: nn.Module, measured: OpsCost) -> OpsCost:
    """Re-book measured SwinIR counts the way 2DQuant's released code does (``flops_all`` in its swinir_arch.py,
    run at img_size 128x128), which is where the paper's Linear & BMM 14.34 G / Conv 2.33 G / Other 0.07 G split
    comes from. Term by term:

    - Linear layers and attention products of the Swin blocks: as measured ("Linear & BMM");
    - conv_first and each RSTB's conv: as measured ("Conv");
    - conv_after_body: H W 3 C C, a third of its true H W 9 C C (the 3 stands where the 3x3 kernel's 9 belongs,
      inherited from SwinIR's ``flops()``);
    - the upsampler conv: H W C 3 9, i.e. 3 output channels instead of 3 s^2, booked as "Other";
    - "Other" also holds the patch-embedding LayerNorm and both LayerNorms of every block (one op per element);
      the final LayerNorm is not counted.

    These are not true counts (the conv share is 2.33 G against 3.11 G measured at 128x128); the convention exists
    to show where the paper's numbers come from and what its speed-up formula gives on them.
    """
    if not twodquant_supported(model):
        raise ValueError("2DQuant's counting is defined for SwinIR with upsampler 'pixelshuffledirect' and "
                         "resi_connection '1conv' only")
    block = "layers.*.residual_group.blocks.*"
    out_channels = model.upsample[0].out_channels
    layers = []
    for layer in measured.layers:
        if matches(layer.name, [f"{block}.attn.*", f"{block}.mlp.*", f"{block}.norm?", "patch_embed.norm",
                                "conv_first", "layers.*.conv"]):
            layers.append(layer)
        elif layer.name == "conv_after_body":
            layers.append(LayerOps(layer.name, layer.kind, layer.ops // 3, layer.bits))
        elif layer.name == "upsample.0":
            layers.append(LayerOps(layer.name, "other", layer.ops * 3 // out_channels, layer.bits))
    return OpsCost(tuple(layers), measured.lr_size)
