"""Packed low-bit checkpoints: bit-exact round trip for every bit-width and granularity, and the size formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from condiquant.archs import build_network
from condiquant.deploy.packed import load_packed, pack_codes, save_packed, unpack_codes
from condiquant.options import QuantOptions
from condiquant.quant.attach import attach_quantizers, weight_quantizer_inputs
from condiquant.quant.calibrate import ObserverSpec, init_bounds
from condiquant.quant.presets import resolve_placement

EMT = {"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
       "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]}
IMDN = {"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_bit_packing_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, 1001).astype(np.uint8)
    data = pack_codes(codes, bits)
    assert len(data) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_codes(data, bits, 1001), codes)


def quantized(net: dict, bits: int, granularity: str, symmetric: bool = False) -> tuple:
    torch.manual_seed(0)
    model = build_network(net).eval()
    quant = QuantOptions(w_bit=bits, a_bit=bits, w_granularity=granularity, w_symmetric=symmetric)
    quant.placement = resolve_placement(net["type"], quant.placement, "quant.placement")
    attach_quantizers(model, quant)
    x = torch.rand(4, 3, 16, 16) * getattr(model, "input_range", 1.0)
    init_bounds(model, [x], ObserverSpec("dobi", dobi_steps=20))
    return model, quant, x


@pytest.mark.parametrize("net", [IMDN, EMT], ids=["imdn", "emt"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_model_is_bit_identical_and_sized_by_the_formula(tmp_path, net, granularity, bits):
    model, quant, x = quantized(net, bits, granularity)
    size = save_packed(tmp_path / "m.cqpack", model, net, quant)
    loaded = load_packed(tmp_path / "m.cqpack", net).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # P - Q FP32 values + b bits per quantized weight + one FP32 (l, u) pair per scale; buffers that a fresh
    # build recreates (EMT's mean shifts and pixel-mixer masks, untouched BatchNorm statistics) are not stored
    q = sum(w.numel() for _, _, w in weight_quantizer_inputs(model))
    pairs = sum(qz.lower.numel() for _, qz, _ in weight_quantizer_inputs(model))
    fresh = dict(build_network(net).named_buffers())
    stored = [t for k, t in model.state_dict().items()
              if t.is_floating_point() and not (k in fresh and torch.equal(fresh[k], t))]
    fp = sum(t.numel() for t in stored) - q - 2 * pairs
    assert size.theoretical_bits == 32 * fp + bits * q + 64 * pairs and size.quantized == q
    assert size.file_bytes == (tmp_path / "m.cqpack").stat().st_size
    assert size.file_bytes < size.theoretical_bytes * 1.25  # tiny nets: the header weighs more than on real ones


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_weights_survive_the_packed_file_and_the_checkpoint(tmp_path, bits):
    from condiquant.quant.checkpoint import build_quantized, save_quantized
    from condiquant.quant.quantizer import SymmetricQuantizer

    model, quant, x = quantized(IMDN, bits, "channel", symmetric=True)
    weight_qs = [q for _, q, _ in weight_quantizer_inputs(model)]
    assert weight_qs and all(type(q) is SymmetricQuantizer for q in weight_qs)
    save_packed(tmp_path / "m.cqpack", model, IMDN, quant)
    save_quantized(tmp_path / "m.pth", model, IMDN, quant)
    with torch.no_grad():
        out = model(x)
        for loaded in (load_packed(tmp_path / "m.cqpack", IMDN), build_quantized(tmp_path / "m.pth", IMDN, "t")):
            assert torch.equal(loaded.eval()(x), out)
            assert all(type(q) is SymmetricQuantizer for _, q, _ in weight_quantizer_inputs(loaded))


@pytest.mark.parametrize("net", [IMDN, EMT], ids=["imdn", "emt"])
def test_frozen_weights_give_the_same_outputs(net):
    from condiquant.quant.attach import freeze_weights

    model, _, x = quantized(net, 3, "channel")
    with torch.no_grad():
        before = model(x)
        frozen = freeze_weights(model)
        assert not any(q.enabled for _, q, _ in weight_quantizer_inputs(frozen))
        assert torch.equal(frozen(x), before)


def test_export_script_and_test_py_score_the_packed_file_like_the_checkpoint(project):
    import json

    import argparse

    from conftest import NET, train_options, write_yaml

    from condiquant.cli import main_test, main_train

    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("dobi"))]) == 0
    from condiquant.deploy.export import main as export

    report = export(argparse.Namespace(opt="train.yml", set=[], checkpoint=None, out=None, format="packed"))
    assert report["packed_bytes"] < report["fakequant_checkpoint_bytes"] / 3
    scores = {}
    for ckpt in (report["checkpoint"], report["packed"]):
        name = "score_" + ckpt.rsplit(".", 1)[1]
        opts = {"name": name, "scale": 2, "network_g": NET, "path": {"pretrain_network_g": ckpt},
                "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
        assert main_test(["-opt", write_yaml(project, "test.yml", opts)]) == 0
        scores[name] = json.loads((project / "results" / name / "metrics.json").read_text())["datasets"]["Bench"]
    assert scores["score_pth"]["images"] == scores["score_cqpack"]["images"]
