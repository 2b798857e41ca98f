"""SwinIR / EDSR: official state-dict layout, parameter counts and forward behaviour.

The frozen numbers (parameter and key counts, shapes) were taken from the official SwinIR (network_swinir.py) and
BasicSR (edsr_arch.py) models built with the configurations of the released checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator

import pytest
import torch
import torch.nn.functional as F

from condiquant.archs.edsr_arch import EDSR
from condiquant.archs.ops import MatMul
from condiquant.archs.registry import ARCH_REGISTRY
from condiquant.archs.swinir_arch import SwinIR, relative_position_index, shifted_window_mask


def swinir_light(scale: int) -> Dict[str, Any]:
    """Config of 002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{scale}.pth."""
    return dict(upscale=scale, in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=[6, 6, 6, 6],
                embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2, upsampler="pixelshuffledirect",
                resi_connection="1conv")


def swinir_classical(scale: int, img_size: int = 64) -> Dict[str, Any]:
    """Config of 001_classicalSR_DF2K_s64w8_SwinIR-M_x{scale}.pth (img_size 48 for the DIV2K s48w8 ones)."""
    return dict(upscale=scale, in_chans=3, img_size=img_size, window_size=8, img_range=1.0, depths=[6] * 6,
                embed_dim=180, num_heads=[6] * 6, mlp_ratio=2, upsampler="pixelshuffle", resi_connection="1conv")


def tiny_swinir(**overrides: Any) -> SwinIR:
    kwargs = dict(upscale=2, img_size=16, window_size=4, depths=[2, 2], embed_dim=12, num_heads=[2, 3],
                  mlp_ratio=2, upsampler="pixelshuffledirect")
    kwargs.update(overrides)
    return SwinIR(**kwargs).eval()


def param_count(model: torch.nn.Module, skip: str = "\0") -> int:
    return sum(p.numel() for name, p in model.named_parameters() if skip not in name)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """These models are small: one intra-op thread is as fast and does not fight other processes for the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def light_x4() -> SwinIR:
    torch.manual_seed(0)
    return SwinIR(**swinir_light(4)).eval()


def test_registered() -> None:
    assert ARCH_REGISTRY["SwinIR"] is SwinIR
    assert ARCH_REGISTRY["EDSR"] is EDSR


def test_swinir_light_param_count(light_x4: SwinIR) -> None:
    assert param_count(light_x4, skip="relative_position_bias_table") == 897_228
    assert param_count(light_x4) == 929_628
    tables = [n for n, _ in light_x4.named_parameters() if "relative_position_bias_table" in n]
    assert len(tables) == 24


def test_swinir_light_state_dict_layout(light_x4: SwinIR) -> None:
    sd = light_x4.state_dict()
    assert len(sd) == 366
    expected = {
        "conv_first.weight": (60, 3, 3, 3),
        "patch_embed.norm.weight": (60,),
        "layers.0.residual_group.blocks.0.norm1.weight": (60,),
        "layers.0.residual_group.blocks.0.attn.relative_position_bias_table": (225, 6),
        "layers.0.residual_group.blocks.0.attn.relative_position_index": (64, 64),
        "layers.0.residual_group.blocks.0.attn.qkv.weight": (180, 60),
        "layers.0.residual_group.blocks.0.attn.proj.weight": (60, 60),
        "layers.0.residual_group.blocks.0.mlp.fc1.weight": (120, 60),
        "layers.0.residual_group.blocks.0.mlp.fc2.weight": (60, 120),
        "layers.3.residual_group.blocks.5.attn_mask": (64, 64, 64),
        "layers.3.conv.weight": (60, 60, 3, 3),
        "norm.bias": (60,),
        "conv_after_body.weight": (60, 60, 3, 3),
        "upsample.0.weight": (48, 60, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sd["layers.0.residual_group.blocks.0.attn.relative_position_index"].dtype == torch.int64
    masks = [k for k in sd if k.endswith("attn_mask")]
    assert len(masks) == 12 and all(int(k.split(".")[4]) % 2 == 1 for k in masks)
    assert sum(isinstance(m, MatMul) for m in light_x4.modules()) == 48


def test_swinir_classical_state_dict_layout() -> None:
    sd = SwinIR(**swinir_classical(2)).state_dict()
    assert len(sd) == 548
    assert tuple(sd["layers.5.residual_group.blocks.5.attn.qkv.weight"].shape) == (540, 180)
    assert tuple(sd["conv_before_upsample.0.weight"].shape) == (64, 180, 3, 3)
    assert tuple(sd["upsample.0.weight"].shape) == (256, 64, 3, 3)
    assert tuple(sd["conv_last.weight"].shape) == (3, 64, 3, 3)
    sd48 = SwinIR(**swinir_classical(3, img_size=48)).state_dict()
    assert tuple(sd48["layers.0.residual_group.blocks.1.attn_mask"].shape) == (36, 64, 64)
    assert tuple(sd48["upsample.0.weight"].shape) == (576, 64, 3, 3)


def test_swinir_strict_load_with_buffers(light_x4: SwinIR) -> None:
    ckpt = {"params": {k: v.clone() for k, v in light_x4.state_dict().items()}}
    assert any(k.endswith("attn_mask") for k in ckpt["params"])
    model = SwinIR(**swinir_light(4))
    model.load_state_dict(ckpt["params"], strict=True)
    for key, value in ckpt["params"].items():
        assert torch.equal(model.state_dict()[key], value), key
    # Buffers are part of the strict contract: a checkpoint without them must be rejected.
    missing = {k: v for k, v in ckpt["params"].items() if not k.endswith("attn_mask")}
    with pytest.raises(RuntimeError):
        model.load_state_dict(missing, strict=True)


@pytest.mark.parametrize("size", [(11, 14), (13, 9)])
def test_swinir_light_forward_shape(light_x4: SwinIR, size: tuple) -> None:
    with torch.no_grad():
        out = light_x4(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * 4, size[1] * 4)
    assert torch.isfinite(out).all()


def test_swinir_pads_by_reflection() -> None:
    torch.manual_seed(0)
    model = tiny_swinir()
    x = torch.rand(2, 3, 10, 13)
    with torch.no_grad():
        out = model(x)
        ref = model(F.pad(x, (0, 3, 0, 2), mode="reflect"))[:, :, :20, :26]
    assert out.shape == (2, 3, 20, 26)
    torch.testing.assert_close(out, ref)


def test_shifted_window_mask_matches_stored_buffer() -> None:
    model = tiny_swinir()
    block = model.layers[0].residual_group.blocks[1]
    assert torch.equal(block.attn_mask, shifted_window_mask(16, 16, 4, 2))
    # Interior windows are unmasked; the bottom-right one is split into 4 regions of 2x2 tokens.
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert int((mask[3] == 0).sum()) == 4 * 4 * 4


def test_swinir_uses_stored_mask_only_at_img_size() -> None:
    """The attn_mask buffer serves inputs of exactly img_size; other sizes get a mask computed at run time."""
    torch.manual_seed(0)
    model = tiny_swinir()
    at_size, other = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        before = model(at_size), model(other)
        for layer in model.layers:
            layer.residual_group.blocks[1].attn_mask.zero_()
        after = model(at_size), model(other)
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1], after[1])


def test_relative_position_index() -> None:
    idx = relative_position_index(8)
    assert idx.shape == (64, 64) and idx.dtype == torch.int64
    assert idx.min() == 0 and idx.max() == 15 * 15 - 1
    assert (idx.diagonal() == 7 * 15 + 7).all()


def test_swinir_identity_range_handling() -> None:
    """With upsampler '' the output is the input plus conv_last(...): zeroing conv_last must give the input back."""
    model = tiny_swinir(upscale=1, upsampler="", img_range=255.0, resi_connection="3conv")
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x)
    assert model.img_range == 255.0 and model.window_size == 4


def test_swinir_rejects_unsupported_configs() -> None:
    with pytest.raises(ValueError, match="upsampler"):
        tiny_swinir(upsampler="nearest+conv")
    with pytest.raises(ValueError, match="upscale"):
        tiny_swinir(upsampler="", upscale=2)
    with pytest.raises(ValueError, match="img_size"):
        tiny_swinir(img_size=18)


def test_edsr_m_layout_and_count() -> None:
    model = EDSR(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4, res_scale=1, img_range=255.0)
    assert param_count(model) == 1_517_571
    sd = model.state_dict()
    assert len(sd) == 74
    assert "body.15.conv2.weight" in sd and "body.16.conv1.weight" not in sd
    assert tuple(sd["upsample.0.weight"].shape) == (256, 64, 3, 3)
    assert tuple(sd["upsample.2.weight"].shape) == (256, 64, 3, 3)
    assert tuple(sd["conv_last.weight"].shape) == (3, 64, 3, 3)
    assert "mean" not in sd
    assert model.img_range == 255.0 and model.window_size == 1
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 28, 36)


@pytest.mark.parametrize("scale, count, keys", [(2, 1_369_859, 72), (3, 1_554_499, 72)])
def test_edsr_m_other_scales(scale: int, count: int, keys: int) -> None:
    model = EDSR(num_feat=64, num_block=16, upscale=scale)
    assert param_count(model) == count
    assert len(model.state_dict()) == keys


def test_edsr_range_handling() -> None:
    """Zeroed conv_last: the network output is 0, so the image is the mean after de-normalisation."""
    model = EDSR(num_feat=8, num_block=2, upscale=2, res_scale=0.1)
    torch.nn.init.zeros_(model.conv_last.weight)
    torch.nn.init.zeros_(model.conv_last.bias)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 5, 6))
    torch.testing.assert_close(out, model.mean.expand_as(out))
