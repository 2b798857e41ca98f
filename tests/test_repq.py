"""RepQ-ViT: the LayerNorm reparameterisation is exact in float64 and its per-tensor grid is the per-channel one."""
from __future__ import annotations

import copy
import json

import torch
from conftest import assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_train
from condiquant.methods.repq import reparam_sites, reparameterise
from condiquant.transforms.equivalence import output_change

SWIN = {"type": "SwinIR", "upscale": 2, "img_size": 16, "window_size": 4, "depths": [2, 2], "embed_dim": 12,
        "num_heads": [2, 3], "mlp_ratio": 2, "upsampler": "pixelshuffledirect"}


def _codes(x, lo, hi, bits):
    s = (hi - lo) / (2 ** bits - 1)
    return torch.round((torch.minimum(torch.maximum(x, lo), hi) - lo) / s)


def test_reparameterisation_is_exact_and_keeps_the_per_channel_codes():
    torch.manual_seed(0)
    fp = build_network(SWIN).eval().double()
    with torch.no_grad():  # channels of very different ranges, as after a trained LayerNorm
        for m in fp.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, dtype=torch.float64) * 3 + 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, dtype=torch.float64))
    sites = reparam_sites(fp, "SwinIR", [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)])
    assert [n for n, _ in sites][:2] == ["layers.0.residual_group.blocks.0.norm1",
                                         "layers.0.residual_group.blocks.0.norm2"] and len(sites) == 8
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    norm, consumers = sites[0]
    seen = {}
    h = fp.get_submodule(norm).register_forward_hook(lambda _m, _i, out: seen.__setitem__("x", out))
    with torch.no_grad():
        fp(x)
    h.remove()
    flat = seen["x"].reshape(-1, seen["x"].shape[-1])
    lower, upper = flat.min(0).values * 0.9, flat.max(0).values * 0.9  # some values clipped
    model = copy.deepcopy(fp)
    lo, hi = reparameterise(model, norm, consumers, lower, upper, 3)
    assert output_change(fp, model, [x], 1.0) < 1e-12
    h = model.get_submodule(norm).register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out))
    with torch.no_grad():
        model(x)
    h.remove()
    per_channel = _codes(seen["x"], lower, upper, 3)
    per_tensor = _codes(seen["y"], torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), 3)
    assert float((per_channel == per_tensor).double().mean()) > 0.9999
    assert len(torch.unique(per_tensor)) == 8


def test_repq_without_sites_is_dobi_and_needs_log2(project, capsys):
    opts = train_options("repq")
    assert main_train(["-opt", write_yaml(project, "bad.yml", opts)]) == 2
    assert "quant.softmax_quantizer: method repq needs 'log2'" in capsys.readouterr().err
    opts["quant"]["softmax_quantizer"] = "log2"
    assert main_train(["-opt", write_yaml(project, "repq.yml", opts)]) == 0
    dobi = train_options("dobi")
    assert main_train(["-opt", write_yaml(project, "dobi.yml", dobi)]) == 0
    a = torch.load(project / "experiments" / "tiny_repq" / "models" / "net_q_latest.pth", weights_only=True)
    b = torch.load(project / "experiments" / "tiny_dobi" / "models" / "net_q_latest.pth", weights_only=True)
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in b["params"])  # IMDN: no LayerNorm site


def test_repq_on_swinir_reparameterises_every_block(project):
    torch.manual_seed(0)
    torch.save({"params": build_network(SWIN).state_dict()}, project / "fp.pth")  # this test's FP model is SwinIR
    opts = train_options("repq")
    opts.update(network_g=SWIN, name="tiny_swin_repq")
    opts["quant"]["softmax_quantizer"] = "log2"
    assert main_train(["-opt", write_yaml(project, "swin.yml", opts)]) == 0
    summary = json.loads((project / "experiments" / "tiny_swin_repq" / "summary.json").read_text())
    assert summary["repq"]["sites"] == 8 and summary["repq"]["float64_output_change"] < 1e-6
    model = assert_quantized(project, project / "experiments" / "tiny_swin_repq" / "models" / "net_q_latest.pth", SWIN)
    # the three qkv input quantizers of a reparameterised block share the per-tensor grid of the folded one
    qkv = [q.lower.item() for q in model.get_submodule("layers.0.residual_group.blocks.0.attn.qkv").input_quantizers]
    assert len(qkv) == 3 and qkv[0] == qkv[1] == qkv[2]
    # the quantizers act on the output (the FP model scores otherwise), and RepQ trains nothing
    assert abs(summary["val_psnr"] - summary["fp_val_psnr"]) > 1e-3
    assert summary["val_psnr"] == summary["val_psnr_iter0"]
