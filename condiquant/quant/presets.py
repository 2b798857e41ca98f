"""Default quantizer placement per arch (used for every ``placement`` key a YAML leaves unset).

SwinIR follows 2DQuant exactly: in each Swin block the q/k/v projections (qkv split in three), proj, fc1 and
fc2 get a weight and an input quantizer, and both attention products get quantizers on both inputs
(q, k, post-softmax map, v): 16 per block, 384 in SwinIR-light. Convolutions, LayerNorm, softmax, GELU and
biases stay full precision.

EMT mirrors that: all body 1x1 convs and attention products. CNNs (EDSR, IMDN) follow the usual SR-CNN practice (PAMS, DAQ, OAQ): every body convolution is quantized,
the first (feature extraction) and last (upsampler) convolutions stay full precision.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Dict

from condiquant.options import PlacementOptions

PRESETS: Dict[str, PlacementOptions] = {
    "SwinIR": PlacementOptions(
        targets=["Linear", "MatMul"],
        include=["layers.*.residual_group.blocks.**"],
        skip=[],
        high_precision=[],
        split_qkv=["**.attn.qkv"],
        one_direction=["**.attn.av_matmul.quant_a", "**.mlp.fc2.input_quantizers.*"],
        post_softmax=["**.attn.av_matmul.quant_a"],
        feature_modules=["layers.*.residual_group"],  # 2DQuant hooks its BasicLayer (= residual_group)
    ),
    # EMT: every 1x1 conv and attention product inside the six mixed-transformer blocks (attention q/v
    # projection, output projection, shifted-MLP fc1/fc2); head, tail and the fixed mean shifts stay FP.
    "EMT": PlacementOptions(
        targets=["Conv2d", "MatMul"],
        include=["body.**"],
        skip=[],
        high_precision=[],
        split_qkv=[],
        # Post-softmax maps and post-Swish inputs are (nearly) one-sided, as 2DQuant's post-GELU inputs.
        one_direction=["**.av_matmuls.*.quant_a", "**.fc2.input_quantizers.*"],
        post_softmax=["**.av_matmuls.*.quant_a"],
        feature_modules=["body.*"],
    ),
    "EDSR": PlacementOptions(
        targets=["Conv2d"],
        include=["body.**", "conv_after_body"],
        skip=[],
        high_precision=[],
        split_qkv=[],
        one_direction=[],
        post_softmax=[],
        feature_modules=["body.*"],
    ),
    "IMDN": PlacementOptions(
        targets=["Conv2d"],
        # All convs of the six IMDBs (incl. the contrast-attention 1x1s), the fusion 1x1 and LR_conv;
        # fea_conv (first) and upsampler.0 (last) stay FP.
        include=["IMDB*.**", "c.0", "LR_conv"],
        skip=[],
        high_precision=[],
        split_qkv=[],
        # Inputs that follow LeakyReLU(0.05) are nearly one-sided, but not exactly: keep the symmetric search.
        one_direction=[],
        post_softmax=[],
        feature_modules=["IMDB*"],
    ),
}


# An arch without preset (a user's own network): every Linear, Conv2d and MatMul is quantized, nothing is kept FP
# and the distillation losses compare outputs only; ``quant.placement`` in the YAML (or the API) refines it.
GENERIC = PlacementOptions(targets=["Linear", "Conv2d", "MatMul"], include=["**"], skip=[], high_precision=[],
                           split_qkv=[], one_direction=[], post_softmax=[], feature_modules=[])


def resolve_placement(arch: str, opt: PlacementOptions, where: str) -> PlacementOptions:
    """Fill unset fields from the arch's preset (``GENERIC`` for an arch without one)."""
    preset = PRESETS.get(arch, GENERIC)
    return replace(opt, **{f.name: getattr(preset, f.name) if getattr(opt, f.name) is None else getattr(opt, f.name)
                           for f in fields(PlacementOptions)})
