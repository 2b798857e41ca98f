"""OAQ: dual-region quantizer (levels, steps, values, gradients), its observer, SAFT sensitivity, train -> test."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.cli import main_test, main_train
from condiquant.methods.oaq import layer_input_stds, parameter_groups, sensitivity_weights
from condiquant.options import QuantOptions
from condiquant.quant import dual_region
from condiquant.quant.attach import attach_quantizers, named_quantizers
from condiquant.quant.dual_region import DualRegionObserver, DualRegionQuantizer, dual_region_quant
from condiquant.quant.quantizer import UniformQuantizer

f64 = torch.float64
LO, HI, BP = -3.0, 5.0, 1.0
# (dense points, total distinct levels) per variant and bit-width, two-sided input
LEVELS = {("paper", 2): 3, ("paper", 3): 5, ("paper", 4): 13, ("paper", 8): 253,
          ("code", 2): 8, ("code", 3): 16, ("code", 4): 32, ("code", 8): 512}


def quantizer(bits: int, levels: str, lo: float = LO, hi: float = HI, bp: float = BP) -> DualRegionQuantizer:
    q = DualRegionQuantizer(bits, levels).double()
    q.set_bounds(torch.tensor(lo), torch.tensor(hi))
    q.set_breakpoint(torch.tensor(bp))
    return q


@pytest.mark.parametrize("levels,bits", list(LEVELS))
def test_level_counts_and_effective_bits(levels, bits):
    q = quantizer(bits, levels)
    # +-bp added exactly: the code variant's lowest dense integer is reached only at x = -bp
    out = q(torch.cat([torch.linspace(LO - 1, HI + 1, 200_001, dtype=f64), torch.tensor([-BP, BP], dtype=f64)]))
    assert len(torch.unique(out)) == LEVELS[levels, bits]
    assert q.effective_bits() == pytest.approx(np.log2(LEVELS[levels, bits]))
    assert out.min() >= LO - 1e-12 and out.max() <= HI + 1e-12


@pytest.mark.parametrize("levels", ["paper", "code"])
def test_one_sided_level_counts(levels):
    q = quantizer(4, levels, lo=-0.5)  # l_a >= -bp: no lower tail
    out = q(torch.cat([torch.linspace(-1, HI + 1, 200_001, dtype=f64), torch.tensor([BP], dtype=f64)]))
    expected = 13 if levels == "paper" else 31  # paper keeps its count; code: two 4-bit grids sharing bp
    assert len(torch.unique(out)) == expected
    assert q.effective_bits() == pytest.approx(np.log2(expected))
    assert out.min().item() == pytest.approx(-0.5) and out.max().item() == pytest.approx(HI)


@pytest.mark.parametrize("levels", ["paper", "code"])
def test_dense_and_tail_steps(levels):
    q = quantizer(4, levels)
    dense_step = 2 * BP / (6 if levels == "paper" else 15)
    up_step = (HI - BP) / (3 if levels == "paper" else 7)
    low_step = (-BP - LO) / (3 if levels == "paper" else 7)
    for region, step, lo, hi in (("dense", dense_step, -BP, BP), ("upper", up_step, BP, HI),
                                 ("lower", low_step, LO, -BP)):
        out = torch.unique(q(torch.linspace(lo + 1e-9, hi - 1e-9, 20_001, dtype=f64)))
        gaps = out.diff()
        torch.testing.assert_close(gaps, torch.full_like(gaps, step), msg=region)


def test_values_equal_hand_written_reference():
    # paper, b = 4: dense {-1, -2/3, ..., 1}; upper tail {1 + 4/3 j}; lower tail {-1 - 2/3 j}, j = 1..3
    q = quantizer(4, "paper")
    x = torch.tensor([0.1, -0.4, 0.95, 1.7, 4.6, 9.0, -1.2, -2.5, -7.0], dtype=f64)
    expected = [0.0, -1 / 3, 1.0, 1 + 4 / 3, 5.0, 5.0, -1.0, -1 - 4 / 3, -3.0]
    torch.testing.assert_close(q(x), torch.tensor(expected, dtype=f64))
    # code, b = 3: dense scale 2/7, integers in [-4, 3]; tails 2-bit, steps 4/3 (upper) and 2/3 (lower)
    # x = bp (3.5 steps) gets the top integer 3; x = -bp gets -4, the only input that reaches it
    q = quantizer(3, "code")
    x = torch.tensor([0.1, 0.95, -0.99, 1.0, -1.0, 1.7, 4.6, -1.2, -2.5], dtype=f64)
    expected = [0.0, 3 * 2 / 7, -3 * 2 / 7, 3 * 2 / 7, -4 * 2 / 7, 1 + 4 / 3, 5.0, -1.0, -3 + 2 / 3]
    torch.testing.assert_close(q(x), torch.tensor(expected, dtype=f64))


def test_two_bit_paper_clips_tails_to_the_breakpoint():
    q = quantizer(2, "paper")
    out = q(torch.tensor([-2.9, -0.7, 0.2, 0.6, 4.0], dtype=f64))
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0], dtype=f64))


@pytest.mark.parametrize("levels,lo", [("paper", LO), ("code", LO), ("paper", -0.5), ("code", -0.5)])
def test_gradients_match_finite_differences_of_the_ste_surrogate(monkeypatch, levels, lo):
    torch.manual_seed(0)
    x = torch.randn(3000, dtype=f64) * 2.5
    x = x[((x.abs() - BP).abs() > 1e-3) & ((x - lo).abs() > 1e-3) & ((x - HI).abs() > 1e-3)]
    g = torch.randn_like(x)
    params = [torch.tensor(v, dtype=f64, requires_grad=True) for v in (lo, HI, BP)]
    (dual_region_quant(x, *params, 3, levels) * g).sum().backward()
    # Surrogate: every round() frozen at its base-point value with an identity slope (calls come in a fixed order).
    frozen: list = []

    def surrogate(*p: torch.Tensor) -> float:
        calls = iter(range(len(frozen)))

        def rnd(z: torch.Tensor) -> torch.Tensor:
            i = next(calls, None)
            if i is None:
                frozen.append((z, torch.round(z)))
                return torch.round(z)
            z0, r0 = frozen[i]
            return r0 + z - z0

        monkeypatch.setattr(dual_region, "round_ste", rnd)
        return float(dual_region_quant(x, *p, 3, levels) @ g)

    with torch.no_grad():
        base = [p.detach() for p in params]
        surrogate(*base)
        eps = 1e-6
        for i, p in enumerate(params):
            up = [b + eps * (j == i) for j, b in enumerate(base)]
            down = [b - eps * (j == i) for j, b in enumerate(base)]
            fd = (surrogate(*up) - surrogate(*down)) / (2 * eps)
            assert p.grad.item() == pytest.approx(fd, rel=1e-5, abs=1e-5)
            assert p.grad.item() != 0.0


def test_observer_minmax_percentile_and_fallback():
    x = torch.cat([torch.linspace(-1, 1, 9901), torch.tensor([-40.0] * 49 + [60.0] * 50)])
    obs = DualRegionObserver(99.0)
    obs.observe(x)
    lo, hi = obs.bounds(4)
    assert lo.item() == -40.0 and hi.item() == 60.0
    assert 0.95 < obs.breakpoint().item() <= 1.0
    flat = DualRegionObserver(99.0)
    flat.observe(torch.full((100,), 2.0))  # percentile == max |x|: no tail -> half the range
    assert flat.breakpoint().item() == 1.0


def test_attach_puts_dual_region_on_conv_inputs_only():
    from condiquant.archs import build_network
    from condiquant.quant.presets import resolve_placement

    quant = QuantOptions(w_bit=4, a_bit=4, a_quantizer="dual_region")
    quant.placement = resolve_placement("EMT", quant.placement, "quant.placement")
    model = build_network({"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
                           "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]})
    attach_quantizers(model, quant)
    kinds = {n: type(q) for n, q in named_quantizers(model)}
    assert all(t is DualRegionQuantizer for n, t in kinds.items() if ".input_quantizers." in n)
    assert all(t is UniformQuantizer for n, t in kinds.items() if ".input_quantizers." not in n)
    assert any(".quant_a" in n for n in kinds) and any(".input_quantizers." in n for n in kinds)


def test_sensitivity_is_scale_free_per_layer_softmax():
    stds = {"b0.conv1": 1.0, "b0.conv2": 2.0, "b1.conv1": 3.0, "tail": 9.0}
    sens = sensitivity_weights(stds, ["b0", "b1"])
    rel = torch.tensor([1.0, 2.0, 3.0, 9.0], dtype=f64) / 3.75
    s = torch.softmax(rel, dim=0)
    expected = torch.stack([s[0] + s[1], s[2]]) / (s[0] + s[1] + s[2])
    torch.testing.assert_close(torch.tensor([sens["b0"], sens["b1"]], dtype=f64), expected)
    scaled = sensitivity_weights({k: 255 * v for k, v in stds.items()}, ["b0", "b1"])  # EMT's x255 inputs
    assert scaled == pytest.approx(sens, rel=1e-12)


def test_layer_input_stds_are_per_sample_means():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()

        def forward(self, x):
            return self.b(3 * self.a(x))

    x = torch.randn(4, 2, 5, 5, dtype=f64)
    stds = layer_input_stds(Net(), ["a", "b"], [x[:2], x[2:]])
    std = x.flatten(1).std(dim=1, correction=0).mean().item()
    assert stds == pytest.approx({"a": std, "b": 3 * std})


def oaq_options(method: str) -> dict:
    opts = train_options(method)
    opts["quant"]["a_quantizer"] = "dual_region"
    opts["saft"] = {"total_iter": 4, "epochs": 4, "batch_size": 2, "patch_size": 12, "print_freq": 1,
                    "val_freq": 1, "save_checkpoint_freq": 1, "select": "best_val"}
    opts["conditioning"] = {"num_patches": 4, "patch_size": 12, "holdout_patches": 2, "iters": 5}
    return opts


@pytest.mark.parametrize("method", ["oaq", "condiquant_oaq"])
def test_oaq_train_then_test_round_trip(project, method):
    assert main_train(["-opt", write_yaml(project, "train.yml", oaq_options(method))]) == 0
    exp = project / "experiments" / f"tiny_{method}"
    ckpt = exp / "models" / "net_q_latest.pth"
    model = assert_quantized(project, ckpt)
    dual = [q for _, q in named_quantizers(model) if isinstance(q, DualRegionQuantizer)]
    assert dual and all(q.breakpoint.item() > 0 for q in dual)
    groups = parameter_groups(model)
    assert [len(g) > 0 for g in groups] == [True, True, True]
    test_opts = {"name": f"score_{method}", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": str(ckpt)},
                 "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test_opts)]) == 0
    report = json.loads((project / "results" / f"score_{method}" / "metrics.json").read_text())
    assert 5 < report["datasets"]["Bench"]["psnr"] < 60


def test_saft_trains_each_group_in_turn_and_resumes(project):
    opts = oaq_options("oaq")
    opts["saft"]["select"] = "last"
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    models = project / "experiments" / "tiny_oaq" / "models"
    states = [torch.load(models / f"net_q_{i}.pth", weights_only=True)["params"] for i in range(4)]
    suffixes = ("weight_quantizers.0.lower", "input_quantizers.0.lower", "breakpoint")
    for epoch, suffix in enumerate(suffixes, start=1):  # epoch e changes group e - 1 only
        changed = {s for s in suffixes for k in states[0] if k.endswith(s) and
                   not torch.equal(states[epoch - 1][k], states[epoch][k])}
        assert changed == {suffix}
    final = torch.load(models / "net_q_latest.pth", weights_only=True)["params"]
    opts["path"]["resume_state"] = str(project / "experiments" / "tiny_oaq" / "training_states" / "2.state")
    assert main_train(["-opt", write_yaml(project, "resume.yml", opts)]) == 0
    again = torch.load(models / "net_q_latest.pth", weights_only=True)["params"]
    for key in final:
        torch.testing.assert_close(again[key], final[key])


def test_oaq_needs_dual_region(project, capsys):
    opts = oaq_options("oaq")
    opts["quant"]["a_quantizer"] = "uniform"
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    assert "quant.a_quantizer: method oaq needs 'dual_region'" in capsys.readouterr().err
