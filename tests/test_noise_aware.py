"""Noise-aware weight correction: closed form == brute-force least squares, held-out gain, model passes."""
from __future__ import annotations

import copy
import json
import logging
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from conftest import NET, load_script, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.archs.emt_arch import ShiftConv1x1
from condiquant.cli import main_train
from condiquant.options import ConditioningOptions, NoiseAwareOptions, PlacementOptions, QuantOptions
from condiquant.quant.attach import attach_quantizers
from condiquant.quant.calibrate import ObserverSpec, init_bounds, init_weight_bounds
from condiquant.quant.presets import resolve_placement
from condiquant.quant.quantizer import UniformQuantizer
from condiquant.transforms.conditioning import conditioning_layers
from condiquant.transforms.noise_aware import (CrossGram, collect_cross_grams, correct_model, noise_aware_weight,
                                               output_error)

f64 = torch.float64


def _data(rows: int, d: int, seed: int):
    """Correlated inputs (a few strong directions) and their 3-bit uniform quantization: a known noise model."""
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=f64) * torch.logspace(0, -1, d)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=f64) @ mix
    q = UniformQuantizer(3)
    q.set_bounds(torch.tensor(-1.5), torch.tensor(1.5))
    with torch.no_grad():
        return x, q(x.float()).double()


def _gram(x: torch.Tensor, xq: torch.Tensor) -> CrossGram:
    g = CrossGram.zeros(x.shape[1], x.device)
    g.add(x.T, xq.T)
    return g


@pytest.mark.parametrize("anchor", ["w0", "zero"])
@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.1])
def test_closed_form_is_the_least_squares_solution_and_helps_out_of_sample(ridge, anchor):
    x, xq = _data(400, 12, seed=0)
    w0 = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=f64)
    gram = _gram(x, xq)
    w = noise_aware_weight(w0, gram, ridge, anchor)
    # Brute force: the ridge problem as one stacked ordinary least-squares problem, solved by SVD.
    rho = ridge * float((xq ** 2).sum()) / 12
    a = torch.cat([xq, rho ** 0.5 * torch.eye(12, dtype=f64)])
    b = torch.cat([x @ w0.T, rho ** 0.5 * (w0.T if anchor == "w0" else torch.zeros(12, 7, dtype=f64))])
    brute = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
    torch.testing.assert_close(w, brute, rtol=1e-8, atol=1e-10)
    # The Gram-based error equals the explicit one, and the fit lowers it in-sample...
    explicit = float((xq @ w.T - x @ w0.T).norm() / (x @ w0.T).norm())
    assert output_error(w, w0, gram) == pytest.approx(explicit, rel=1e-8)
    assert output_error(w, w0, gram) < output_error(w0, w0, gram)
    # ... and on fresh data from the same noise model (out-of-sample).
    held = _gram(*_data(400, 12, seed=2))
    assert output_error(w, w0, held) < 0.9 * output_error(w0, w0, held)


def test_zero_noise_gives_back_w0():
    x, _ = _data(200, 6, seed=3)
    w0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=f64)
    torch.testing.assert_close(noise_aware_weight(w0, _gram(x, x), 0.0), w0)


class _Net(nn.Module):
    """conv 3x3 -> EMT shift 1x1 -> linear over channels: every kind of input the pass unfolds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.shift = ShiftConv1x1(5, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.shift(torch.relu(self.conv(x)))).permute(0, 2, 3, 1))


def _quantized(fp: nn.Module, batches) -> nn.Module:
    quant = QuantOptions(4, 3, placement=PlacementOptions(["Linear", "Conv2d"], ["**"], [], [], 8, [], [], []))
    model = copy.deepcopy(fp)
    attach_quantizers(model, quant)
    init_bounds(model, batches, ObserverSpec("dobi", dobi_steps=20))
    return model


def test_cross_grams_use_the_layers_own_quantizer_on_the_transformed_input():
    torch.manual_seed(0)
    fp = _Net().eval()
    batches = [torch.rand(2, 3, 7, 9)]
    qm = _quantized(fp, batches)
    stats = collect_cross_grams(fp, qm, {"shift": 1, "fc": 1}, batches, 1.0)
    with torch.no_grad():
        feat = torch.relu(fp.conv(batches[0]))
        x = fp.shift.transform_input(feat).permute(0, 2, 3, 1).reshape(-1, 5).double()  # 1x1: rows = positions
        xq = qm.shift.input_quantizers[0](fp.shift.transform_input(feat)).permute(0, 2, 3, 1).reshape(-1, 5).double()
    assert not torch.equal(x, xq)
    torch.testing.assert_close(stats["shift"].xq, x.T @ xq)
    torch.testing.assert_close(stats["shift"].qq, xq.T @ xq)
    assert stats["fc"].rows == 2 * 7 * 9


@pytest.mark.parametrize("sequential", [False, True])
def test_model_pass_lowers_in_sample_error_and_refits_weight_bounds(sequential):
    torch.manual_seed(0)
    fp = _Net().eval()
    calib, holdout = [torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)], [torch.rand(2, 3, 8, 8)]
    qm = _quantized(fp, calib)
    refitted = []

    def refit(name):
        init_weight_bounds(qm, ObserverSpec("minmax"), modules=[name])
        refitted.append(name)

    opts = ConditioningOptions(passes=["noise_aware"], noise_aware=NoiseAwareOptions(ridge=1e-4,
                                                                                      sequential=sequential))
    layers = {"conv": 1, "shift": 1, "fc": 1}
    report = correct_model(qm, fp, layers, opts, calib, holdout, 1.0, refit, logging.getLogger("t"))
    assert refitted == list(layers) and [r.name for r in report.layers] == list(layers)
    assert all(r.error_calib_after < r.error_calib_before for r in report.layers)
    assert all(r.calib_rows == 6 * 64 for r in report.layers)
    assert not torch.equal(qm.fc.weight, fp.fc.weight)
    # Refitted bounds follow the new weights (per-tensor min/max).
    assert float(qm.fc.weight_quantizers[0].upper.detach()) == pytest.approx(float(qm.fc.weight.detach().max()))
    if sequential:  # the first layer sees the same input either way; later ones see corrected predecessors
        par = _quantized(fp, calib)
        p_report = correct_model(par, fp, layers, replace(opts, noise_aware=NoiseAwareOptions(ridge=1e-4)),
                                 calib, holdout, 1.0, lambda n: init_weight_bounds(par, ObserverSpec("minmax"),
                                                                                   modules=[n]),
                                 logging.getLogger("t"))
        torch.testing.assert_close(qm.conv.weight, par.conv.weight)
        assert report.layers[1].error_calib_before != pytest.approx(p_report.layers[1].error_calib_before)


@pytest.mark.parametrize("passes,sequential", [(["noise_aware"], False), (["prox", "noise_aware"], True),
                                               (["noise_aware", "prox"], False)])
def test_condiquant_with_noise_aware_passes_trains(project, passes, sequential):
    opts = train_options("condiquant")
    opts["conditioning"] = {"passes": passes, "num_patches": 4, "patch_size": 12, "holdout_patches": 2,
                            "iters": 5, "noise_aware": {"ridge": 1e-2, "sequential": sequential}}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_condiquant"
    report = json.loads((exp / "noise_aware.json").read_text())
    assert (exp / "noise_aware.png").stat().st_size > 0
    assert report["sequential"] is sequential and report["layers"]
    assert (exp / "conditioning.json").is_file() == ("prox" in passes)
    layers = conditioning_layers(build_network(NET), resolve_placement_quant(), ConditioningOptions())
    assert {r["name"] for r in report["layers"]} == set(layers)


def resolve_placement_quant() -> QuantOptions:
    quant = QuantOptions(4, 4)
    return replace(quant, placement=resolve_placement("IMDN", quant.placement, "test"))


def test_passes_must_not_repeat(project, capsys):
    opts = train_options("condiquant")
    opts["conditioning"] = {"passes": ["prox", "prox"]}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    assert "conditioning.passes" in capsys.readouterr().err


def test_ablation_script_scores_every_cell_on_the_validation_split(project, monkeypatch):
    script = load_script("ablate_noise_aware")
    opts = train_options("condiquant")
    opts["conditioning"] = {"num_patches": 4, "patch_size": 12, "holdout_patches": 2}
    path = write_yaml(project, "train.yml", opts)
    monkeypatch.setattr(sys, "argv", ["ablate_noise_aware.py", "-opt", str(path), "--ridges", "1e-3", "1e-1",
                                      "--num-patches", "2", "4", "--name", "tiny"])
    script.main()
    data = json.loads((project / "results" / "ablation_noise_aware_tiny.json").read_text())
    cells = data["cells"]
    assert len(cells) == 8 and data["chosen"]["val_psnr"] == max(c["val_psnr"] for c in cells)
    assert all(c["error_calib_after"] < c["error_calib_before"] for c in cells if c["mode"] == "parallel")
    assert [c["rows"] for c in cells] == [2 * 144] * 4 + [4 * 144] * 4  # 12x12 crops, 3x3 convs padded
    assert "Chosen (best validation PSNR)" in (project / "results" / "ablation_noise_aware_tiny.md").read_text()
