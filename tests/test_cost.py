"""Size and ops calculator: hand-counted tiny model, SwinIR-light x4 against 2DQuant's published figures."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from condiquant.archs import build_network
from condiquant.archs.ops import MatMul
from condiquant.options import PlacementOptions, QuantOptions
from condiquant.quant.attach import attach_quantizers
from condiquant.quant.cost import measure_ops, storage_cost, twodquant_ops, twodquant_supported
from condiquant.quant.presets import resolve_placement

SWINIR_LIGHT_X4 = {"type": "SwinIR", "upscale": 4, "img_size": 64, "window_size": 8, "img_range": 1.0,
                   "depths": [6, 6, 6, 6], "embed_dim": 60, "num_heads": [6, 6, 6, 6], "mlp_ratio": 2,
                   "upsampler": "pixelshuffledirect", "resi_connection": "1conv"}


def preset_quant(arch: str, bits: int, granularity: str = "tensor") -> QuantOptions:
    return QuantOptions(bits, bits, granularity, placement=resolve_placement(arch, PlacementOptions(), "test"))


class Tiny(nn.Module):
    """One of each counted layer type, on a 1x3x5x6 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 6)
        self.mm = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        t = self.fc(self.norm(y.flatten(2).transpose(1, 2)))  # (1, 30, 6)
        return self.mm(t, t.transpose(1, 2)).sum() + self.down(y).sum()


def tiny_quant(high_precision: list) -> QuantOptions:
    place = PlacementOptions(targets=["Linear", "Conv2d", "MatMul"], include=["fc", "mm", "down"], skip=[],
                             high_precision=high_precision, high_precision_bit=8, split_qkv=[], one_direction=[],
                             feature_modules=[])
    return QuantOptions(4, 4, placement=place)


def test_tiny_model_counts_by_hand():
    ops = measure_ops(Tiny(), tiny_quant([]), (5, 6))
    by_name = {layer.name: layer for layer in ops.layers}
    # conv: 30 px x 4 out x 3 in x 9; down: stride 2 -> 3x3 px x 4 out x (4 / 2 groups) x 9
    assert by_name["conv"].ops == 30 * 4 * 3 * 9 and by_name["conv"].bits is None
    assert by_name["down"].ops == 9 * 4 * 2 * 9 and by_name["down"].bits == 4
    assert by_name["norm"].ops == 30 * 4 and by_name["norm"].kind == "other"
    assert by_name["fc"].ops == 30 * 4 * 6
    assert by_name["mm"].ops == 30 * 30 * 6  # (30 x 6) @ (6 x 30)
    assert ops.by_kind() == {"Linear": 720, "MatMul": 5400, "Conv2d": 3240 + 648, "other": 120}
    quantized = 648 + 720 + 5400
    assert ops.speedup == pytest.approx((3240 + 120 + quantized) / (3240 + 120 + quantized * 4 / 32))


def test_tiny_model_storage_by_hand_with_a_high_precision_layer():
    model = Tiny()
    # P: conv 3*4*9 + 4, down 4*2*9 + 4, norm 4 + 4, fc 4*6 + 6 = 112 + 76 + 8 + 30; Q: down and fc weights
    low = storage_cost(model, tiny_quant([]))
    assert (low.params, low.quantized_params, low.quantized_bits) == (226, 72 + 24, 96 * 4)
    assert low.ratio == pytest.approx(32 * 226 / (32 * 130 + 4 * 96))
    high = storage_cost(model, tiny_quant(["fc"]))
    assert high.quantized_bits == 72 * 4 + 24 * 8
    assert {layer.name: layer.bits for layer in measure_ops(model, tiny_quant(["fc"]), (5, 6)).layers}["fc"] == 8


def test_leaves_the_model_alone_and_refuses_a_quantized_one():
    model = Tiny()
    measure_ops(model, tiny_quant([]), (5, 6))
    assert all(p.device.type == "cpu" for p in model.parameters())
    attach_quantizers(model, tiny_quant([]))
    with pytest.raises(ValueError, match="float model"):
        measure_ops(model, tiny_quant([]), (5, 6))


@pytest.fixture(scope="module")
def swinir() -> nn.Module:
    return build_network(SWINIR_LIGHT_X4)


@pytest.mark.parametrize("bits, ratio", [(4, 3.07), (3, 3.31), (2, 3.60)])
def test_swinir_light_storage_matches_2dquant(swinir, bits, ratio):
    cost = storage_cost(swinir, preset_quant("SwinIR", bits))
    assert (cost.params, cost.quantized_params) == (897_228, 691_200)
    assert round(cost.ratio, 2) == ratio


def test_swinir_position_bias_tables_can_be_counted(swinir):
    # 24 tables of (2*8-1)^2 x 6
    assert storage_cost(swinir, preset_quant("SwinIR", 4), include_position_bias=True).params == 897_228 + 32_400


def test_swinir_light_ops_at_128(swinir):
    ops = measure_ops(swinir, preset_quant("SwinIR", 4), (128, 128))
    kinds = ops.by_kind()
    pixels = 128 * 128
    # Per LR pixel and block: qkv, proj, fc1, fc2 = 60*180 + 60*60 + 60*120 + 120*60; q k^T and attn v in 8x8
    # windows = 2 * 6 heads * 64 * 10.
    assert kinds["Linear"] == 24 * 28_800 * pixels
    assert kinds["MatMul"] == 24 * 7_680 * pixels
    assert kinds["Linear"] + kinds["MatMul"] == 14_344_519_680  # 2DQuant's "Linear & BMM 14.34 G"
    # conv_first 3->60, four RSTB convs and conv_after_body 60->60, upsampler 60->48, all 3x3
    assert kinds["Conv2d"] == (3 * 60 + 5 * 60 * 60 + 60 * 48) * 9 * pixels
    assert kinds["other"] == 50 * 60 * pixels  # 24 * 2 block LayerNorms, patch_embed.norm and the final norm
    assert ops.by_kind(quantized_only=True) == {**kinds, "Conv2d": 0, "other": 0}


@pytest.mark.parametrize("bits, speedup", [(4, 3.99), (3, 4.47), (2, 5.08)])
def test_swinir_light_ops_counted_as_2dquant_reproduce_the_paper(swinir, bits, speedup):
    assert twodquant_supported(swinir)
    measured = measure_ops(swinir, preset_quant("SwinIR", bits), (128, 128))
    paper = twodquant_ops(swinir, measured)
    kinds = paper.by_kind()
    assert round((kinds["Linear"] + kinds["MatMul"]) / 1e9, 2) == 14.34
    assert round(kinds["Conv2d"] / 1e9, 2) == 2.33
    assert round(kinds["other"] / 1e9, 2) == 0.07
    assert round(paper.speedup, 2) == speedup
    # The true count has the full conv cost at 32 bits, hence a smaller speed-up.
    assert measured.speedup < paper.speedup


@pytest.mark.parametrize("arch", ["EMT", "IMDN"])
def test_cnn_and_emt_costs(arch):
    model = build_network({"type": arch, "upscale": 4})
    quant = preset_quant(arch, 4, "channel")
    storage = storage_cost(model, quant)
    assert 0 < storage.quantized_params < storage.params and storage.ratio > 1
    ops = measure_ops(model, quant, (32, 32))
    quantized = sum(ops.by_kind(quantized_only=True).values())
    assert 0 < quantized < ops.total and ops.speedup > 1
    assert not twodquant_supported(model)
    with pytest.raises(ValueError, match="SwinIR"):
        twodquant_ops(model, ops)
