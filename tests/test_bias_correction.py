"""Empirical bias correction (bound_init.bias_correction): it cancels the mean output change of weight quantization
layer by layer, the trained checkpoint carries it, and methods that do not run it refuse the option."""
from __future__ import annotations

import pytest
import torch
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_train
from condiquant.options import QuantOptions
from condiquant.quant.attach import attach_quantizers, named_quantizers, quant_modules
from condiquant.transforms.bias_correction import correct_biases
from condiquant.quant.calibrate import ObserverSpec, init_bounds
from condiquant.quant.presets import resolve_placement


def _quantized_imdn():
    torch.manual_seed(0)
    fp = build_network(NET).eval()
    model = build_network(NET).eval()
    model.load_state_dict(fp.state_dict())
    quant = QuantOptions(w_bit=2, a_bit=2, w_granularity="channel")
    quant.placement = resolve_placement("IMDN", quant.placement, "quant.placement")
    attach_quantizers(model, quant)
    return fp, model


@torch.no_grad()
def test_each_layer_keeps_its_fp_mean_output_with_quantized_weights():
    """After the correction each quantized layer, fed its FP inputs, has with quantized weights the FP layer's mean
    output per channel; before it, it did not; quantizer states are restored."""
    fp, model = _quantized_imdn()
    batches = [torch.rand(4, 3, 16, 16)]
    init_bounds(model, batches, ObserverSpec("dobi", dobi_steps=20))
    states = {n: q.enabled for n, q in named_quantizers(model)}
    before = {n: m.bias.clone() for n, m in quant_modules(model) if m.bias is not None}
    fp_modules, captured = dict(fp.named_modules()), {}  # cloned: IMDN's CCA applies an in-place ReLU next
    hooks = [fp_modules[n].register_forward_hook(lambda _, i, o, n=n: captured.__setitem__(n, (i[0], o.clone())))
             for n in before]
    fp(batches[0])
    for h in hooks:
        h.remove()

    def offsets():
        out = {}
        for name, module in quant_modules(model):
            if name in before:
                for q in module.input_quantizers:
                    q.enabled = False
                x, y = captured[name]
                out[name] = ((module(x) - y).mean(dim=(0, 2, 3)).abs().max(), y.abs().max())
                for q in module.input_quantizers:
                    q.enabled = True
        return out

    uncorrected = offsets()
    shifts = correct_biases(model, batches)
    assert set(shifts) == set(before)
    assert {n: q.enabled for n, q in named_quantizers(model)} == states
    corrected = offsets()
    for name, (offset, scale) in corrected.items():
        assert offset < 1e-4 * scale + 1e-6
    # it was a real offset: most layers had one well above that tolerance (the CCA convs with one input channel
    # per group quantize exactly)
    assert sum(uncorrected[n][0] > 1e-2 * uncorrected[n][1] for n in before) >= len(before) - 2
    assert sum(not torch.equal(m.bias, before[n]) for n, m in quant_modules(model) if n in before) >= len(before) - 2


def test_trained_checkpoint_carries_the_corrected_biases(project):
    opts = train_options("2dquant")
    opts["bound_init"] = {"bias_correction": True, "dobi_steps": 20}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    ckpt = project / "experiments" / "tiny_2dquant" / "models" / "net_q_latest.pth"
    model = assert_quantized(project, ckpt)
    fp = torch.load(project / "fp.pth", weights_only=True)["params"]
    moved = [n for n, m in quant_modules(model) if m.bias is not None and not torch.equal(m.bias, fp[f"{n}.bias"])]
    assert len(moved) > 10
    logs = (project / "experiments" / "tiny_2dquant").glob("*.log")
    assert "bias correction:" in "".join(p.read_text() for p in logs)


@pytest.mark.parametrize("method", ["oaq", "brecq"])
def test_methods_that_do_not_run_it_refuse_the_option(project, capsys, method):
    opts = train_options(method)
    opts["bound_init"] = {"bias_correction": True}
    if method == "oaq":
        opts["quant"]["a_quantizer"] = "dual_region"
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    err = capsys.readouterr().err
    assert "bound_init.bias_correction" in err and method in err
    assert not (project / "experiments").exists()
