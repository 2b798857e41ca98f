"""PTQ4ViT: twin-uniform grids equal hand-written references; the Hessian-guided search keeps its best candidate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_train
from condiquant.methods.ptq4vit import Chunk, _scores, search_weights, set_symmetric, start_step
from condiquant.quant.twin import TwinUniformQuantizer

EMT = {"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
       "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]}


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_twin_softmax_equals_a_hand_written_reference(bits):
    q = TwinUniformQuantizer(bits, "softmax").double()
    q.set_bounds(torch.tensor(0.0), torch.tensor(1.0))
    half = 2 ** (bits - 1)
    large = 1 / (half - 1)
    q.set_steps(large / 8, large)
    x = torch.rand(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(bits)) ** 3
    out = q(x)
    for v, o in zip(x.tolist()[:500], out.tolist()[:500]):
        step = large / 8 if v < half * large / 8 else large
        assert o == pytest.approx(min(round(v / step), half - 1) * step, abs=1e-12)
    assert len(torch.unique(out)) <= 2 ** bits


@pytest.mark.parametrize("bits", [3, 4])
def test_twin_activation_equals_a_hand_written_reference(bits):
    q = TwinUniformQuantizer(bits, "activation").double()
    q.set_bounds(torch.tensor(-0.28, dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64))  # post-Swish
    half = 2 ** (bits - 1)
    neg, pos = 0.28 / half, 6.0 / (half - 0.5)
    assert q.steps.tolist() == pytest.approx([neg, pos])
    x = torch.linspace(-0.5, 7.0, 2001, dtype=torch.float64)
    for v, o in zip(x.tolist(), q(x).tolist()):
        ref = max(round(v / neg), -half) * neg if v < 0 else min(round(v / pos), half - 1) * pos
        assert o == pytest.approx(ref, abs=1e-12)


def test_weight_search_keeps_each_channels_best_candidate():
    from condiquant.options import PlacementOptions, QuantOptions
    from condiquant.quant.attach import attach_quantizers
    from condiquant.quant.presets import resolve_placement

    torch.manual_seed(0)
    model = build_network({"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 1}).eval()
    quant = QuantOptions(w_bit=3, a_bit=8, w_granularity="channel",
                         placement=resolve_placement("IMDN", PlacementOptions(), "t"))
    attach_quantizers(model, quant)
    conv = model.get_submodule("IMDB1.c1")
    x = torch.randn(4, 16, 10, 10)
    with torch.no_grad():
        conv.input_quantizers[0].enabled = False
        fp = torch.nn.functional.conv2d(x, conv.weight, conv.bias, **conv.conv_args)
    chunks: list[Chunk] = [((x,), fp, torch.rand_like(fp))]
    q = conv.weight_quantizers[0]
    q.set_bounds(conv.weight.detach().flatten(1).amin(1), conv.weight.detach().flatten(1).amax(1))
    starts = {id(q): start_step(q)}
    alphas = 0.01 + np.arange(20) * 1.19 / 20
    search_weights(conv, chunks, alphas, starts)
    chosen = _scores(conv, chunks)
    for a in alphas:  # no candidate beats the chosen one on any output channel
        set_symmetric(q, float(a) * starts[id(q)])
        assert bool((_scores(conv, chunks) <= chosen + 1e-9 * chosen.abs()).all())


def test_ptq4vit_runs_on_emt_with_both_twins(project, capsys):
    torch.manual_seed(0)
    torch.save({"params": build_network(EMT).state_dict()}, project / "fp.pth")  # this test's FP model is EMT
    opts = train_options("ptq4vit")
    opts.update(network_g=EMT, name="tiny_ptq4vit")
    opts["ptq4vit"] = {"num_patches": 4, "patch_size": 12, "candidates": 5, "rounds": 1}
    assert main_train(["-opt", write_yaml(project, "bad.yml", opts)]) == 2
    assert "method ptq4vit needs softmax_quantizer and post_act_quantizer 'twin'" in capsys.readouterr().err
    opts["quant"].update(softmax_quantizer="twin", post_act_quantizer="twin")
    assert main_train(["-opt", write_yaml(project, "p.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_ptq4vit"
    model = assert_quantized(project, exp / "models" / "net_q_latest.pth", EMT)
    twins = [m for m in model.modules() if isinstance(m, TwinUniformQuantizer)]
    assert {m.kind for m in twins} == {"softmax", "activation"}
    assert np.isfinite(json.loads((exp / "summary.json").read_text())["val_psnr"])
