"""Rotation pass: orthogonal matrices, exact weight transforms, attention along its reduction axes, the quantized
rotated product, checkpoints, and the per-site decision."""
from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.archs.emt_arch import ShiftConv1x1
from condiquant.cli import main_train
from condiquant.config import ConfigError, from_dict
from condiquant.deploy.packed import load_packed, save_packed
from condiquant.options import ConditioningOptions, PlacementOptions, QuantOptions, RotateOptions
from condiquant.quant.attach import attach_quantizers, named_quantizers, set_quant_enabled
from condiquant.quant.checkpoint import build_quantized, save_quantized
from condiquant.quant.modules import QuantConv2d, QuantLinear
from condiquant.quant.presets import resolve_placement
from condiquant.transforms.rotation import (attention_sites, hadamard, orthogonal, rotate_input, rotate_model,
                                            rotated_class)

LOG = logging.getLogger("test_rotation")
EMT = {"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
       "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]}
SWINIR = {"type": "SwinIR", "upscale": 2, "img_size": 8, "window_size": 4, "img_range": 1.0, "depths": [1],
          "embed_dim": 12, "num_heads": [2], "mlp_ratio": 2, "upsampler": "pixelshuffledirect",
          "resi_connection": "1conv"}


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 48, 60, 64, 120, 180, 240])
def test_hadamard_orders_the_archs_need(n):
    h = hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n,kind", [(60, "hadamard"), (10, "random"), (3, "random")])
def test_orthogonal_matrices(n, kind):
    assert hadamard(10) is None and hadamard(30) is None  # no Hadamard matrix of order 2 mod 4 beyond 2
    r, got = orthogonal(n, "hadamard", np.random.default_rng(0))
    assert got == kind and r.dtype == torch.float64
    torch.testing.assert_close(r.T @ r, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layer", [nn.Linear(8, 5), nn.Conv2d(8, 6, 3, padding=1), ShiftConv1x1(10, 4)])
def test_rotated_layer_is_exact_in_float64_and_quantizes_the_rotated_operands(layer):
    torch.manual_seed(0)
    layer = layer.double()
    c = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    x = torch.randn(2, 7, c, dtype=torch.float64) if isinstance(layer, nn.Linear) else \
        torch.randn(2, c, 6, 7, dtype=torch.float64)
    y0 = layer(x)
    r, _ = orthogonal(c, "hadamard", np.random.default_rng(1))
    w0 = layer.weight.detach().clone()
    rotate_input(layer, r)
    assert type(layer).__name__.startswith("Rotated") and layer.rotation.shape == (c, c)
    torch.testing.assert_close(layer(x), y0, atol=1e-12, rtol=0)
    rotate_input(layer, r.T)  # composing with the inverse gives the original weight back
    torch.testing.assert_close(layer.weight, w0, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.rotation, torch.eye(c, dtype=torch.float64), atol=1e-12, rtol=0)

    rotate_input(layer, r)
    quant = QuantOptions(w_bit=3, a_bit=3)
    wrap = nn.Sequential(layer)
    attach_quantizers(wrap, replace_placement(quant, ["0"]))
    q = wrap[0]
    assert isinstance(q, (QuantLinear, QuantConv2d)) and torch.equal(q.rotation, layer.rotation)
    set_quant_enabled(wrap, False)
    torch.testing.assert_close(q(x), y0, atol=1e-12, rtol=0)
    set_quant_enabled(wrap, True)
    a_lo, a_hi = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    q.input_quantizers[0].set_bounds(a_lo, a_hi)
    w = layer.weight.detach()
    q.weight_quantizers[0].set_bounds(w.min(), w.max())
    # by hand: the layer's quantizers on x R (after the shift, for EMT's layer) and on the stored W R, multiplied
    qa, qw = q.input_quantizers[0], q.weight_quantizers[0]
    xt = x if not isinstance(layer, ShiftConv1x1) else ShiftConv1x1.transform_input(layer, x)
    if isinstance(layer, nn.Linear):
        ref = F.linear(qa(xt @ r), qw(w), layer.bias)
    else:
        ref = F.conv2d(qa(torch.einsum("bihw,ij->bjhw", xt, r)), qw(w), layer.bias, padding=layer.padding)
    torch.testing.assert_close(q(x), ref, atol=1e-12, rtol=0)
    assert len(torch.unique(qa(xt @ r if isinstance(layer, nn.Linear) else
                               torch.einsum("bihw,ij->bjhw", xt, r)))) <= 8  # 3 bits: on the grid


def replace_placement(quant: QuantOptions, include):
    quant.placement = from_dict(PlacementOptions, {"targets": ["Linear", "Conv2d"], "include": include, "skip": [],
                                                   "split_qkv": [], "high_precision": [], "one_direction": [],
                                                   "post_softmax": []}, "p")
    return quant


def _quant(arch: str, bits: int = 4) -> QuantOptions:
    quant = QuantOptions(w_bit=bits, a_bit=bits, w_granularity="channel")
    quant.placement = resolve_placement(arch, quant.placement, "p")
    return quant


@pytest.mark.parametrize("net,arch", [({"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}, "IMDN"),
                                      (EMT, "EMT"), (SWINIR, "SwinIR")])
def test_rotating_every_site_is_exact_and_rebuilds_from_its_checkpoint(net, arch, tmp_path):
    torch.manual_seed(0)
    fp = build_network(net).eval()
    if arch == "EMT":  # non-trivial BatchNorm statistics, so the fold before the attention rotation is tested
        for m in fp.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 2)
    model = copy.deepcopy(fp)
    opts = RotateOptions(select="all", dobi_steps=5)
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    holdout = [torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))]
    report = rotate_model(model, _quant(arch), opts, calib, holdout, 1.0, LOG, tmp_path)
    assert report.output_change <= 1e-6 and all(s.rotated for s in report.sites)
    kinds = {s.kind for s in report.sites}
    assert kinds == ({"online"} if arch == "IMDN" else {"online", "qk", "v"})
    assert json.loads((tmp_path / "rotation.json").read_text())["sites"]
    # quantized: the checkpoint holds the rotations, and a fresh build reproduces the model exactly
    quant = _quant(arch)
    attach_quantizers(model, quant)
    for _, q in named_quantizers(model):
        q.set_bounds(torch.full_like(q.lower, -1.0), torch.full_like(q.upper, 1.0))
    save_quantized(tmp_path / "q.pth", model, net, quant)
    rebuilt = build_quantized(tmp_path / "q.pth", net, "test").eval()
    save_packed(tmp_path / "q.packed", model, net, quant)
    unpacked = load_packed(tmp_path / "q.packed", net).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(unpacked(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("net", [EMT, SWINIR])
def test_attention_products_stay_on_their_reduction_axes(net):
    """After the pass, q (and k) and v reach their MatMuls rotated along the head dimension: (qR)(kR)^T = q k^T
    and the attention output is (softmax v) R, undone inside the output projection's weight (float64: EMT's
    unscaled softmax amplifies float32 rounding)."""
    torch.manual_seed(0)
    fp = build_network(net).double().eval()
    model = copy.deepcopy(fp)
    seen = {}

    def grab(tag):
        def hook(m, args):
            seen.setdefault(tag, []).append([a.detach().clone() for a in args])
        return hook

    def operands(network, tag):
        site = attention_sites(network)[0]
        handles = [mm.register_forward_pre_hook(grab(f"{tag}.qk")) for mm, _ in site.qk_operands[:1]]
        handles += [mm.register_forward_pre_hook(grab(f"{tag}.v")) for mm, _ in site.v_operands[:1]]
        with torch.no_grad():
            network(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        for h in handles:
            h.remove()
        return site

    operands(fp, "fp")
    rotate_model(model, _quant(net["type"]), RotateOptions(select="all", online=False, dobi_steps=5),
                 torch.rand(1, 3, 8, 8, dtype=torch.float64), [torch.rand(1, 3, 8, 8)], 1.0, LOG)
    operands(model, "rot")
    (qa, qb), (ra, rb) = seen["fp.qk"][0][:2], seen["rot.qk"][0][:2]
    hd = attention_sites(model)[0].head_dim
    assert qa.shape[-1] == hd and not torch.allclose(qa, ra, atol=1e-4)
    torch.testing.assert_close(ra @ rb, qa @ qb, atol=1e-9, rtol=1e-9)  # the product reduces over the rotated axis
    r = torch.linalg.lstsq(qa.reshape(-1, hd), ra.reshape(-1, hd)).solution  # ra = qa R
    torch.testing.assert_close(r.T @ r, torch.eye(hd, dtype=torch.float64), atol=1e-8, rtol=0)
    (fa, fv), (ga, gv) = seen["fp.v"][0][:2], seen["rot.v"][0][:2]
    torch.testing.assert_close(ga, fa, atol=1e-9, rtol=1e-9)  # the attention map itself is unchanged
    rv = torch.linalg.lstsq(fv.reshape(-1, hd), gv.reshape(-1, hd)).solution
    torch.testing.assert_close(rv.T @ rv, torch.eye(hd, dtype=torch.float64), atol=1e-8, rtol=0)
    assert not torch.allclose(rv, torch.eye(hd, dtype=torch.float64), atol=1e-3)


class _Spiky(nn.Module):
    """fc's input: smooth features plus a few huge spikes, the case rotation is for (a per-tensor range set by rare
    extremes); fc is the identity, so its output error is its input's quantization error."""

    def __init__(self):
        super().__init__()
        self.lift, self.fc = nn.Linear(3, 16), nn.Linear(16, 16)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(16))
        spikes = torch.zeros(16, 16, 16)
        spikes[3, 5, 2], spikes[11, 7, 9], spikes[2, 13, 14] = 40.0, -35.0, 50.0
        self.register_buffer("spikes", spikes)

    def forward(self, x):
        return self.fc(self.lift(x.permute(0, 2, 3, 1)) + self.spikes).mean(-1, keepdim=True).permute(0, 3, 1, 2)


def test_error_selection_rotates_spiky_inputs_and_keeps_only_sites_that_improve():
    torch.manual_seed(0)
    model = _Spiky().eval()
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    quant = replace_placement(QuantOptions(w_bit=8, a_bit=4, w_granularity="channel"), ["fc"])
    report = rotate_model(model, quant, RotateOptions(dobi_steps=50), calib, [calib[:1]], 1.0, LOG)
    fc = next(s for s in report.sites if s.name == "fc")
    assert fc.rotated and fc.error_after < 0.8 * fc.error_before and type(model.fc).__name__ == "RotatedLinear"
    # on a real arch, some sites improve and some do not: the decision follows the measured error exactly
    net = build_network({"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}).eval()
    report = rotate_model(net, _quant("IMDN", 3), RotateOptions(dobi_steps=20), calib, [calib[:1]], 1.0, LOG)
    assert 0 < sum(s.rotated for s in report.sites) < len(report.sites)
    assert all((s.error_after < s.error_before) == s.rotated for s in report.sites)
    for s in report.sites:
        assert (getattr(net.get_submodule(s.name), "rotation", None) is not None) == s.rotated


def test_rotate_must_precede_noise_aware():
    with pytest.raises(ConfigError, match="rotate transforms the FP network"):
        from_dict(ConditioningOptions, {"passes": ["noise_aware", "rotate"]}, "conditioning")


@pytest.mark.parametrize("passes", [["rotate"], ["prox", "rotate", "noise_aware"]])
def test_condiquant_with_rotation_trains_and_resumes_into_a_rotated_model(project, passes):
    opts = train_options("condiquant")
    opts["conditioning"] = {"passes": passes, "num_patches": 4, "patch_size": 12, "holdout_patches": 2, "iters": 5,
                            "rotate": {"select": "all", "num_patches": 2, "patch_size": 12, "dobi_steps": 5}}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_condiquant"
    report = json.loads((exp / "rotation.json").read_text())
    assert report["sites"] and report["output_change"] <= 1e-6
    model = assert_quantized(project, exp / "models" / "net_q_latest.pth")
    assert any(type(m).__name__ == "QuantConv2d" and getattr(m, "rotation", None) is not None
               for m in model.modules())
    # resume from the middle: the state's rotations are restored before its weights are loaded, and the run ends
    # where the uninterrupted one did
    full = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    opts["path"]["resume_state"] = str(exp / "training_states" / "2.state")
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    again = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    assert again.keys() == full.keys() and any(k.endswith(".rotation") for k in full)
    for key in full:
        torch.testing.assert_close(again[key], full[key])


def test_rotated_class_is_cached_and_idempotent():
    cls = rotated_class(nn.Conv2d)
    assert rotated_class(nn.Conv2d) is cls and rotated_class(cls) is cls and cls.rotation_base is nn.Conv2d


def test_bench_rotation_script_reports_pass_psnr_and_online_share(project):
    from conftest import load_script

    opts = train_options("condiquant")
    opts["conditioning"] = {"holdout_patches": 2, "patch_size": 12,
                            "rotate": {"num_patches": 2, "patch_size": 12, "dobi_steps": 5}}
    path = write_yaml(project, "train.yml", opts)
    bench = load_script("bench_rotation")
    bench.main(bench.parse(["-opt", str(path), "--bits", "4", "2"]), "python scripts/bench_rotation.py")
    data = json.loads((project / "results" / "bench_rotation_tiny_condiquant.json").read_text())
    assert set(data["bits"]) == {"4", "2"} and all(b["output_change"] <= 1e-6 for b in data["bits"].values())
    assert set(data["timing"]) == {"fp_plain", "fp_rotated", "fq_plain", "fq_rotated"}
    assert "share" in (project / "results" / "bench_rotation_tiny_condiquant.md").read_text()
