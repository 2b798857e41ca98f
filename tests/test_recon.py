"""Reconstruction with learned rounding: AdaRound's grid, baking, block caching, train -> test, exact resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_test, main_train
from condiquant.methods.recon import unit_inputs, unit_outputs
from condiquant.options import PlacementOptions, QuantOptions
from condiquant.quant.adaround import AdaRoundQuantizer, attach_rounding, bake_rounding, has_rounding
from condiquant.quant.attach import attach_quantizers, weight_quantizer_inputs
from condiquant.quant.presets import resolve_placement
from condiquant.quant.quantizer import UniformQuantizer, fake_quant


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hard_rounding_is_floor_or_ceil_on_the_grid(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 5, 3, 3, generator=g)
    src = UniformQuantizer(bits, 6, channel_axis=0)
    src.set_bounds(w.flatten(1).amin(1) * 0.8, w.flatten(1).amax(1) * 0.8)  # some weights are clipped
    q = AdaRoundQuantizer(src, w)
    lo, hi = src.lower.view(-1, 1, 1, 1), src.upper.view(-1, 1, 1, 1)
    s = (hi - lo) / (2 ** bits - 1)
    with torch.no_grad():
        torch.testing.assert_close(q.up(), torch.ones_like(w) * (q.up() > 0))  # hard: 0 or 1
        torch.testing.assert_close(q.quantize(w), fake_quant(w, lo, hi, bits))  # at the start: round to nearest
        q.rounding.copy_(torch.randn(w.shape, generator=g) * 3)
        out = q.quantize(w)
    pos = (w.clamp(lo, hi) - lo) / s
    code = (out - lo) / s
    assert torch.allclose(code, code.round(), atol=1e-4)  # on the grid
    code = code.round()
    assert bool(((code == pos.floor()) | (code == pos.ceil())).all())  # floor or ceil, nothing else
    assert bool((code == pos.floor()).any() and (code == pos.ceil()).any() and (code >= 0).all()
                and (code <= 2 ** bits - 1).all())
    q.hard = False
    with torch.no_grad():
        q.rounding.copy_(AdaRoundQuantizer(src, w).rounding)  # soft at the start: the clipped weight itself
        torch.testing.assert_close(q.quantize(w), w.clamp(lo, hi), atol=2e-4 * float(s.max()), rtol=0)


def _quantized_tiny(bits: int = 4):
    torch.manual_seed(0)
    fp = build_network(NET).eval()
    quant = QuantOptions(w_bit=bits, a_bit=bits, w_granularity="channel",
                         placement=resolve_placement("IMDN", PlacementOptions(), "test"))
    model = copy.deepcopy(fp)
    attach_quantizers(model, quant)
    for _, q, w in weight_quantizer_inputs(model):
        q.set_bounds(w.detach().flatten(1).amin(1), w.detach().flatten(1).amax(1))
    for name, m in model.named_modules():
        if isinstance(m, UniformQuantizer) and not name.split(".")[-2] == "weight_quantizers":
            m.set_bounds(torch.tensor(-1.0), torch.tensor(1.0))
    return fp, model


def test_baked_checkpoint_reproduces_learned_rounding_bit_for_bit():
    _, model = _quantized_tiny(3)
    attach_rounding(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaRoundQuantizer):
                m.rounding.copy_(torch.randn(m.rounding.shape, generator=g))
    x = torch.rand(2, 3, 10, 11, generator=g)
    with torch.no_grad():
        before = model(x)
        bake_rounding(model)
        assert not has_rounding(model)
        assert not any(k.endswith("rounding") for k in model.state_dict())
        assert torch.equal(model(x), before)


def test_block_caching_equals_a_full_forward():
    _, model = _quantized_tiny(4)
    batches = [torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    names = ["IMDB1", "IMDB2", "c.0", "LR_conv"]
    full = unit_outputs(model, names, batches)
    for name in names:
        args, kwargs = unit_inputs(model, name, batches)
        with torch.no_grad():
            assert torch.equal(model.get_submodule(name)(*args, **kwargs), full[name])


def _recon_options(method: str, **recon):
    opts = train_options(method)
    opts["quant"]["w_granularity"] = "channel"
    opts["recon"] = {"iters_per_block": 6, "num_patches": 4, "batch_size": 2, "patch_size": 12, "lr": 0.1,
                     "print_freq": 3, "save_checkpoint_freq": 3, **recon}
    return opts


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_recon_train_then_test_round_trip(project, method):
    assert main_train(["-opt", write_yaml(project, "train.yml", _recon_options(method))]) == 0
    exp = project / "experiments" / f"tiny_{method}"
    summary = json.loads((exp / "summary.json").read_text())
    units = list(summary["recon_units"])
    expected = ["IMDB1", "IMDB2", "c.0", "LR_conv"] if method != "adaround" else None
    assert units == expected or (method == "adaround" and len(units) > 4 and units[-1] == "LR_conv")
    ckpt = exp / "models" / "net_q_latest.pth"
    model = assert_quantized(project, ckpt)
    # the stored weights are on their grid (re-quantizing them changes nothing) and some differ from nearest
    fp = torch.load(project / "fp.pth", weights_only=True)["params"]
    flipped = 0
    with torch.no_grad():
        for name, q, w in weight_quantizer_inputs(model):
            assert torch.equal(q(w), w), name
            module = name.split(".weight_quantizers")[0]
            if ".weight_quantizers.0" in name:
                flipped += int((q(fp[f"{module}.weight"]) != w).sum())
    assert flipped > 0
    test = {"name": f"t_{method}", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": str(ckpt)},
            "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test)]) == 0


def test_qdrop_resume_in_a_later_block_reproduces_the_uninterrupted_run(project):
    opts = _recon_options("qdrop")
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_qdrop"
    full = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    resumed = _recon_options("qdrop")
    resumed["path"]["resume_state"] = str(exp / "training_states" / "9.state")  # inside the second unit
    assert main_train(["-opt", write_yaml(project, "resume.yml", resumed)]) == 0
    again = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    assert all(torch.equal(again[k], full[k]) for k in full)
    changed = _recon_options("qdrop", drop_prob=0.25)
    changed["path"]["resume_state"] = str(exp / "training_states" / "9.state")
    assert main_train(["-opt", write_yaml(project, "changed.yml", changed)]) == 2


def test_qdrop_keeps_fp_values_with_its_probability():
    from condiquant.methods.recon import _Reconstruction

    q = UniformQuantizer(2)
    q.set_bounds(torch.tensor(0.0), torch.tensor(1.0))
    rec = _Reconstruction.__new__(_Reconstruction)
    rec.drop_prob, rec.drop_gen = 0.5, torch.Generator().manual_seed(0)
    x = torch.rand(100_000, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    out = rec._drop(q, (x,), q(x))
    kept_fp = (out == x).float().mean()
    assert abs(float(kept_fp) - 0.5) < 0.01
    assert bool(((out == x) | (out == q(x))).all())


def test_unmatched_blocks_is_a_one_line_error(project, capsys):
    opts = _recon_options("brecq", blocks=["nothing.*"])
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    assert "recon.blocks" in capsys.readouterr().err


def test_recon_after_the_noise_aware_pass_keeps_its_weights_as_the_start(project):
    opts = _recon_options("brecq", conditioning=True)
    opts["conditioning"] = {"passes": ["noise_aware"], "num_patches": 4, "patch_size": 12, "holdout_patches": 2}
    assert main_train(["-opt", write_yaml(project, "na.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_brecq"
    assert (exp / "noise_aware.json").is_file()
    model = assert_quantized(project, exp / "models" / "net_q_latest.pth")
    with torch.no_grad():
        assert all(torch.equal(q(w), w) for _, q, w in weight_quantizer_inputs(model))


def test_fisher_weight_is_the_squared_task_loss_gradient_of_the_unit_output():
    from condiquant.methods.recon import unit_fisher

    torch.manual_seed(0)
    fp = build_network(NET).eval()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    hr = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    w = unit_fisher(fp, "IMDB2", [x[:2], x[2:]], [hr[:2], hr[2:]])  # two chunks: same as one batch
    feat = {}
    handle = fp.IMDB2.register_forward_hook(lambda _m, _i, out: feat.setdefault("out", out))
    out = fp(x)
    handle.remove()
    (g,) = torch.autograd.grad(torch.nn.functional.l1_loss(out, hr, reduction="sum"), [feat["out"]])
    ref = g.pow(2)
    torch.testing.assert_close(w, ref / ref.mean(), rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in fp.parameters())  # nothing accumulated in the FP network


def test_brecq_with_fisher_weighting_trains(project):
    opts = _recon_options("brecq")
    opts["recon"]["weighting"] = "fisher"
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    assert_quantized(project, project / "experiments" / "tiny_brecq" / "models" / "net_q_latest.pth")
