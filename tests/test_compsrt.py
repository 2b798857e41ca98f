"""CompSRT's in-quantizer Hadamard quantizer: the grid against a hand-written reference, calibration on rotated
values, the trained scalars, and the refusals of the integer exports."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_train
from condiquant.config import ConfigError, from_dict
from condiquant.deploy.packed import save_packed
from condiquant.grid import describe
from condiquant.options import PlacementOptions, QuantOptions, TrainOptions
from condiquant.quant.attach import attach_quantizers, named_quantizers
from condiquant.quant.hadamard import HadamardQuantizer
from condiquant.quant.observers import MinMaxObserver
from condiquant.quant.presets import resolve_placement
from condiquant.quant.quantizer import fake_quant


def _h(n: int) -> torch.Tensor:
    h = torch.tensor([[1.0]])
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / math.sqrt(n)


@pytest.mark.parametrize("d,axis", [(8, -1), (10, -1), (6, 1)])
def test_grid_is_pad_rotate_quantize_rotate_back_crop(d, axis):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, d, 5, generator=g) if axis == 1 else torch.randn(4, 3, d, generator=g)
    q = HadamardQuantizer(3, axis=axis)
    q.set_bounds(torch.tensor(-1.0), torch.tensor(1.5))
    n = 1 << (d - 1).bit_length()
    h = _h(n)
    xl = x.movedim(axis, -1)
    ref = fake_quant(torch.nn.functional.pad(xl, (0, n - d)) @ h, torch.tensor(-1.0), torch.tensor(1.5), 3)
    ref = (ref @ h)[..., :d].movedim(-1, axis)
    torch.testing.assert_close(q(x), ref, atol=1e-6, rtol=0)
    with torch.no_grad():  # the scalar decomposition: s + alpha, Z = l + beta, codes not clamped
        q.alpha.fill_(0.1)
        q.beta.fill_(-0.2)
    s, z = 2.5 / 7 + 0.1, -1.0 - 0.2
    y = torch.nn.functional.pad(xl, (0, n - d)) @ h
    ref = (torch.round((y.clamp(-1.0, 1.5) - z) / s) * s + z) @ h
    torch.testing.assert_close(q(x), ref[..., :d].movedim(-1, axis), atol=1e-5, rtol=0)


def test_clamped_codes_keep_2_to_the_b_codes():
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 8, generator=g)
    h = _h(8)
    y = (x @ h).clamp(-1.0, 1.5)
    s, z = 0.5 * 2.5 / 7, -1.0  # alpha = -half the nominal step: [l, u] holds 15 codes unclamped
    unclamped = torch.round((y - z) / s)
    assert torch.unique(unclamped).numel() > 8
    ref = ((unclamped.clamp(0, 7) * s + z) @ h)
    for clamp, want in ((True, ref), (False, (unclamped * s + z) @ h)):
        q = HadamardQuantizer(3, axis=-1, clamp_codes=clamp)
        q.set_bounds(torch.tensor(-1.0), torch.tensor(1.5))
        with torch.no_grad():
            q.alpha.fill_(-0.5 * 2.5 / 7)
        torch.testing.assert_close(q(x), want, atol=1e-5, rtol=0)


def test_observer_sees_the_rotated_values():
    x = torch.zeros(2, 8)
    x[:, 1] = 4.0  # one outlier channel: the rotation spreads it over all 8 (+-4 / sqrt(8) each)
    q = HadamardQuantizer(4, axis=-1)
    q.observer = MinMaxObserver()
    assert torch.equal(q(x), x)  # calibration passes the input through
    assert float(q.observer.hi) == pytest.approx(4 / math.sqrt(8)) and float(q.observer.lo) == pytest.approx(
        -4 / math.sqrt(8))


def test_every_quantizer_is_hadamard_and_the_row_is_not_deployable():
    quant = QuantOptions(w_bit=4, a_bit=4, w_granularity="channel", hadamard=True)
    quant.placement = resolve_placement("IMDN", PlacementOptions(), "p")
    model = build_network(NET)
    attach_quantizers(model, quant)
    qs = dict(named_quantizers(model))
    assert qs and all(isinstance(q, HadamardQuantizer) for q in qs.values())
    assert all(q.axis == 1 for n, q in qs.items())  # convolutions: input channels (weights and activations)
    with pytest.raises(ConfigError, match="quant.hadamard"):
        save_packed(__import__("pathlib").Path("/nonexistent/x.packed"), model, NET, quant)
    quant.hadamard_codes = "clamped"
    model = build_network(NET)
    attach_quantizers(model, quant)
    assert all(q.clamp_codes for _, q in named_quantizers(model))
    with pytest.raises(ConfigError, match="hadamard_codes: clamped needs hadamard: true"):
        from_dict(QuantOptions, {"w_bit": 4, "a_bit": 4, "hadamard_codes": "clamped"}, "quant")
    with pytest.raises(ConfigError, match="quant.hadamard: true exactly when method is compsrt"):
        from_dict(TrainOptions, {**train_options("2dquant"), "quant": {"w_bit": 4, "a_bit": 4, "hadamard": True}},
                  "t")


def test_compsrt_trains_bounds_and_scalars_and_rebuilds(project):
    opts = train_options("compsrt")
    opts["quant"]["hadamard"] = True
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    ckpt = project / "experiments" / "tiny_compsrt" / "models" / "net_q_latest.pth"
    params = torch.load(ckpt, weights_only=True)["params"]
    assert any(k.endswith(".alpha") and bool(v.abs().sum() > 0) for k, v in params.items())  # DQC moved them
    model = assert_quantized(project, ckpt)
    assert all(isinstance(q, HadamardQuantizer) for _, q in named_quantizers(model))
    info = describe(from_dict(TrainOptions, opts, "t"))
    assert info["deployable"] is False


def test_effective_levels_counts_the_codes_a_moved_alpha_opens(project):
    from conftest import load_script

    opts = train_options("compsrt")
    opts["quant"]["hadamard"] = True
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    ckpt = project / "experiments" / "tiny_compsrt" / "models" / "net_q_latest.pth"
    raw = torch.load(ckpt, weights_only=True)
    params = {k: v.clone() for k, v in raw["params"].items()}
    script = load_script("effective_levels")
    for k in [k for k in params if k.endswith((".alpha", ".beta"))]:
        params[k].zero_()
    assert script.levels(params, 4, 4)["over"] == 0.0 and script.levels(params, 4, 4)["median"] == 16
    name = next(k for k in params if k.endswith(".alpha"))[: -len(".alpha")]
    nominal = (params[f"{name}.upper"] - params[f"{name}.lower"]) / 15
    params[f"{name}.alpha"] = -0.5 * nominal  # half the step: the same range now holds 31 codes
    r = script.levels(params, 4, 4)
    assert 0 < r["over"] < 1 and r["alpha_min"] == pytest.approx(-0.5)
    clamped = script.levels(params, 4, 4, clamped=True)  # quant.hadamard_codes: clamped keeps at most 2^b codes
    assert clamped["over"] == 0.0 and clamped["median"] == 16
