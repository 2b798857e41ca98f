"""ONNX export of a quantized model as QuantizeLinear / DequantizeLinear pairs, for integer execution in ONNX
Runtime (which fuses Q/DQ around Conv and MatMul into QLinearConv / QLinearMatMul / MatMulInteger).

Every uniform quantizer becomes a Q/DQ pair on an integer grid: scale s = (u - l) / (2^b - 1) and zero point
z = round(-l / s) (ONNX needs an integer zero point; our grids start at l, so the exported grid is ours shifted by
less than s / 2). Activations are uint8 codes (below 8 bits, a Clip to the b-bit range first), weights int8
codes with zero point 0 up to 6 bits and on symmetric grids (``quant.w_symmetric``), per tensor or per output
channel as trained. The graph takes and returns images in 0..1 (a model's
``input_range`` is applied inside). Shapes: ``tile=None`` exports dynamic H and W (works for convolutional
archs); window-attention archs (EMT, SwinIR) compute their window padding from Python ints, so they are exported
at a fixed ``tile`` x ``tile`` LR input and :class:`condiquant.deploy.onnx_runtime.OnnxSR` tiles larger images
outside the graph. Dual-region (OAQ) and log√2 quantizers have no ONNX integer form: such a model is refused.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn as nn

from condiquant.config import ConfigError
from condiquant.quant.attach import named_quantizers, weight_quantizer_inputs
from condiquant.quant.dual_region import DualRegionQuantizer
from condiquant.quant.hadamard import HadamardQuantizer
from condiquant.quant.log2 import Log2Quantizer
from condiquant.quant.observers import DOBIObserver
from condiquant.quant.quantizer import SymmetricQuantizer, UniformQuantizer
from condiquant.quant.twin import TwinUniformQuantizer


class QDQ(nn.Module):
    """A trained uniform quantizer as ONNX Q/DQ: ``fake_quantize_*_affine`` exports to QuantizeLinear +
    DequantizeLinear (opset >= 13)."""

    def __init__(self, q: UniformQuantizer, weight: bool):
        super().__init__()
        levels = 2 ** q.n_bits - 1
        lower, upper = q.lower.detach().float(), q.upper.detach().float()
        scale = torch.clamp(upper - lower, min=1e-8) / levels
        zero = torch.clamp(torch.round(-lower / scale), 0, levels)
        self.per_channel = q.channel_axis is not None
        self.axis = q.channel_axis or 0
        # weights as int8 codes c - offset (QLinearConv's usual weight type). Up to 6 bits the offset is the zero
        # point itself: the stored zero point is 0, which ONNX Runtime's fast symmetric kernels need (2.7x faster
        # on a 64-channel 3x3 conv than with a nonzero one), and |code| <= 63, so its AVX2 kernels (which add pairs
        # of u8 x s8 products in int16) cannot saturate. At 7 and 8 bits the codes are centred (c - 2^(b-1)): the
        # zero point is 0 when the grid is symmetric (quant.w_symmetric)
        if not weight:
            offset = torch.zeros_like(zero)
        elif q.n_bits <= 6:
            offset = zero
        else:
            offset = torch.full_like(zero, 2 ** (q.n_bits - 1))
        stored = (zero - offset).to(torch.int32)
        self.register_buffer("scale", scale if self.per_channel else scale.reshape(()))
        self.register_buffer("zero", stored if self.per_channel else stored.reshape(()))
        # the b-bit range inside the 8-bit container; None at 8 bits (the Q op saturates there itself)
        self.clip = None if q.n_bits == 8 else ((0 - zero) * scale, (levels - zero) * scale)
        self.qmin, self.qmax = (-128, 127) if weight else (0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            lo, hi = self.clip
            shape = [1] * x.dim()
            if self.per_channel:
                shape[self.axis] = -1
            x = torch.minimum(torch.maximum(x, lo.reshape(shape)), hi.reshape(shape))
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero, self.axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero), self.qmin, self.qmax)


class _ImageIO(nn.Module):
    """0..1 in and out, whatever range the network itself works in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.r = float(getattr(model, "input_range", 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.r) / self.r


@torch.no_grad()
def align_zero_points(model: nn.Module) -> nn.Module:
    """Shift every uniform quantizer's (l, u) by less than half a step so that -l / s is an integer: the
    fake-quant model then computes exactly what its ONNX export computes (in place; returns ``model``)."""
    for _, q in named_quantizers(model):
        # a symmetric grid's zero point is 2^(b-1) already
        if isinstance(q, (DualRegionQuantizer, SymmetricQuantizer)) or not bool(q.initialized):
            continue
        levels = 2 ** q.n_bits - 1
        width = torch.clamp(q.upper - q.lower, min=1e-8)
        s = width / levels
        zero = torch.clamp(torch.round(-q.lower / s), 0, levels)
        q.lower.copy_(-zero * s)
        q.upper.copy_(-zero * s + width)
    return model


def to_qdq(model: nn.Module) -> nn.Module:
    """A copy of the quantized ``model`` whose quantizers are :class:`QDQ` modules (same names)."""
    quantizers = list(named_quantizers(model))
    for name, q in quantizers:
        if isinstance(q, (DualRegionQuantizer, Log2Quantizer, TwinUniformQuantizer, HadamardQuantizer)):
            raise ConfigError(f"{name}: a {type(q).__name__} has no integer ONNX form; export a model with uniform "
                              f"quantizers only (quant.a_quantizer / softmax_quantizer / post_act_quantizer: "
                              f"uniform, quant.hadamard: false)")
    for name, q in quantizers:
        if q.enabled and not bool(q.initialized):
            raise ConfigError(f"{name}: quantizer has no bounds (not calibrated)")
    out = copy.deepcopy(model).eval()
    weights = {n for n, _, _ in weight_quantizer_inputs(out)}
    for name, q in list(named_quantizers(out)):
        if not q.enabled:  # e.g. weights frozen for scoring: they are quantized already
            continue
        out.set_submodule(name, QDQ(q, name in weights))
    return out


class OutputQDQ(nn.Module):
    """A quantized layer followed by an 8-bit Q/DQ of its output: ONNX Runtime fuses DQ -> Conv/MatMul -> Q into
    QLinearConv / QLinearMatMul only when the output is quantized too (the fake-quant model keeps it FP, so this
    adds one 8-bit rounding per layer)."""

    def __init__(self, layer: nn.Module, q: UniformQuantizer):
        super().__init__()
        self.layer, self.out = layer, QDQ(q, weight=False)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(*args))


@torch.no_grad()
def quantize_outputs(model: nn.Module, batches, input_range: float = 1.0, float_outputs: int = 0) -> List[str]:
    """Wrap the quantized Linear/Conv2d layers of a :func:`to_qdq` model in :class:`OutputQDQ` (in place). Each
    output range is DOBI's 8-bit search over the outputs on ``batches`` (LR crops in 0..1): min/max ranges are
    stretched by rare outliers (IMDN x4: 12-36 wide). The ``float_outputs`` layers whose output rounding costs the
    most keep float outputs (ONNX Runtime runs them as float ops on dequantized operands): the cost of a layer is
    how much closer the model comes to its float-output self on the first batch when that one rounding is
    removed. Returns the names of the layers left float."""
    from condiquant.quant.modules import QuantConv2d, QuantLinear

    if float_outputs < 0:
        raise ConfigError(f"float_outputs: must be >= 0, got {float_outputs}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    observers = {name: DOBIObserver(max_samples=1 << 18) for name, _ in layers}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=n: observers[name].observe(out)) for n, m in layers]
    try:
        for batch in batches:
            model(batch * input_range)
    finally:
        for h in handles:
            h.remove()
    first = batches[0] * input_range
    reference = model(first) if float_outputs else None
    wrapped = {}
    for name, layer in layers:
        q = UniformQuantizer(8)
        q.set_bounds(*observers[name].bounds(8))
        wrapped[name] = OutputQDQ(layer, q)
        model.set_submodule(name, wrapped[name])
    if not float_outputs:
        return []

    def error() -> float:
        return float((model(first) - reference).pow(2).mean())

    full = error()
    gain = {}
    for name, w in wrapped.items():
        model.set_submodule(name, w.layer)
        gain[name] = full - error()
        model.set_submodule(name, w)
    kept = sorted(gain, key=gain.__getitem__, reverse=True)[:float_outputs]
    for name in kept:
        model.set_submodule(name, wrapped[name].layer)
    return kept


def export_onnx(model: nn.Module, path: Path, scale: int, tile: Optional[int] = None, opset: int = 17,
                output_batches=None, float_outputs: int = 0) -> Path:
    """Write the quantized ``model`` to ``path`` (see the module docstring); returns ``path``. With
    ``output_batches`` (LR crops in 0..1) the quantized layers' outputs get 8-bit Q/DQ too, but for the
    ``float_outputs`` layers where that rounding costs most (:func:`quantize_outputs`), so that ONNX Runtime runs
    the convolutions as QLinearConv. The metadata names the layers left float."""
    import onnx

    qdq = to_qdq(model)
    kept: List[str] = []
    if output_batches is not None:
        kept = quantize_outputs(qdq, list(output_batches), float(getattr(model, "input_range", 1.0)), float_outputs)
    graph = _ImageIO(qdq).eval()
    side = tile or 32
    sample = torch.rand(1, 3, side, side)
    dynamic = None if tile else {"lr": {2: "h", 3: "w"}, "sr": {2: "sh", 3: "sw"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(graph, (sample,), str(path), dynamo=False, opset_version=opset, input_names=["lr"],
                          output_names=["sr"], dynamic_axes=dynamic, do_constant_folding=True)
    proto = onnx.load(str(path))
    weights = {n for n, _, _ in weight_quantizer_inputs(model)}
    bits = {True: 0, False: 0}  # widest weight / activation grid (the runner warns about 8 x 8 bits on AVX2)
    for name, q in named_quantizers(model):
        if q.enabled:
            bits[name in weights] = max(bits[name in weights], q.n_bits)
    meta = {"scale": scale, "tile": tile or 0, "producer": "condiquant", "w_bits": bits[True], "a_bits": bits[False],
            "float_outputs": kept}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, json.dumps(v)
    onnx.save(proto, str(path))
    return path
