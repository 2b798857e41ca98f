"""NoisyQuant: the noisy bias leaves the layer's FP output unchanged, the search never makes a layer worse on its
calibration data, and train.py -> test.py runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.cli import main_test, main_train
from condiquant.methods.noisyquant import choose_noise
from condiquant.quant.modules import QuantConv2d, QuantLinear


@pytest.mark.parametrize("kind", ["conv3x3", "linear_split"])
def test_noisy_bias_leaves_the_fp_output_unchanged(kind):
    torch.manual_seed(0)
    if kind == "conv3x3":
        src, x = nn.Conv2d(4, 5, 3, padding=1), torch.randn(2, 4, 7, 6)
        layer = QuantConv2d(src, 4, 4)
        layer.enable_noisy_bias(4)
    else:
        src, x = nn.Linear(6, 9), torch.randn(2, 5, 6)
        layer = QuantLinear(src, 4, 4, splits=3)
        layer.enable_noisy_bias(6)
    layer.noisy_bias.copy_(torch.randn(layer.noisy_bias.shape) * 3)  # quantizers uninitialised: pass-through
    torch.testing.assert_close(layer(x), src(x), atol=1e-5, rtol=1e-5)  # exact at the zero-padded borders too


def test_search_keeps_the_best_amplitude_and_never_worsens_the_layer():
    torch.manual_seed(0)
    src = nn.Conv2d(3, 4, 1)
    layer = QuantConv2d(src, 8, 3)
    layer.enable_noisy_bias(3)
    x = torch.randn(4, 3, 8, 8) ** 3  # heavy-tailed input
    layer.input_quantizers[0].set_bounds(x.min(), x.max())
    layer.weight_quantizers[0].set_bounds(src.weight.min(), src.weight.max())
    report = choose_noise(layer, src, x, [0.0, 0.5, 1.0], torch.Generator().manual_seed(0))
    assert report["errors"][report["amplitude"]] == min(report["errors"].values()) <= report["errors"][0.0]
    with torch.no_grad():
        assert float((layer(x) - src(x)).pow(2).mean()) == pytest.approx(report["errors"][report["amplitude"]])


def test_noisyquant_train_then_test(project, capsys):
    opts = train_options("noisyquant")
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2  # needs quant.noisy_bias
    assert "quant.noisy_bias" in capsys.readouterr().err
    opts["quant"]["noisy_bias"] = True
    opts["noisyquant"] = {"num_patches": 2, "patch_size": 12}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    ckpt = project / "experiments" / "tiny_noisyquant" / "models" / "net_q_latest.pth"
    model = assert_quantized(project, ckpt)
    assert any(m.noisy_bias is not None and m.noisy_bias.abs().sum() > 0 for m in model.modules()
               if isinstance(m, (QuantConv2d, QuantLinear)))
    test = {"name": "s", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": str(ckpt)},
            "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test)]) == 0
