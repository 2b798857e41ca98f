"""scripts/quant_sensitivity.py on a trained checkpoint: its bounds are scored as trained, one group per module."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import load_script, train_options, write_yaml

from condiquant.cli import main_train


def _run(script, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["quant_sensitivity.py", *args])
    with torch.no_grad():
        script.main()


def test_checkpoint_bounds_score_as_the_run_validated_them(project, monkeypatch):
    opt = write_yaml(project, "train.yml", train_options("dobi"))
    assert main_train(["-opt", opt]) == 0
    run = project / "experiments" / "tiny_dobi"
    script = load_script("quant_sensitivity")
    _run(script, monkeypatch, "-opt", opt, "--checkpoint", str(run / "models" / "net_q_latest.pth"), "--per-module")
    rows = {r.split(" | ")[0].lstrip("| "): r for r in
            (project / "results" / "sensitivity_tiny_dobi.md").read_text().splitlines() if r.startswith("| ")}
    val = json.loads((run / "summary.json").read_text())["val_psnr"]
    assert float(rows["all"].split(" | ")[2]) == pytest.approx(val, abs=0.005)  # every quantizer, as trained
    per_module = [k for k in rows if k.startswith("inputs of ")]
    assert per_module and all(" | 1 | " in rows[k] or " | 2 | " in rows[k] for k in per_module)


def test_a_float_checkpoint_is_refused_with_exit_code_2(project, monkeypatch, capsys):
    opt = write_yaml(project, "train.yml", train_options("dobi"))
    script = load_script("quant_sensitivity")
    with pytest.raises(SystemExit) as exc:
        _run(script, monkeypatch, "-opt", opt, "--checkpoint", str(project / "fp.pth"))
    assert exc.value.code == 2 and "fp.pth" in capsys.readouterr().err
    assert not (project / "results").exists()


def test_bias_correction_cancels_the_mean_output_change_of_weight_quantization():
    """After correct_biases, each quantized layer fed the FP inputs has (quantized weights) the FP layer's mean
    output per channel; the biases moved (except where per-channel grids hold a one-weight channel exactly)."""
    from condiquant.archs import build_network
    from condiquant.options import QuantOptions
    from condiquant.quant.attach import attach_quantizers, quant_modules
    from condiquant.quant.calibrate import ObserverSpec, init_bounds
    from condiquant.quant.presets import resolve_placement

    script = load_script("quant_sensitivity")
    torch.manual_seed(0)
    net = {"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}
    fp = build_network(net).eval()
    model = build_network(net).eval()
    model.load_state_dict(fp.state_dict())
    quant = QuantOptions(w_bit=2, a_bit=2, w_granularity="channel")
    quant.placement = resolve_placement("IMDN", quant.placement, "quant.placement")
    attach_quantizers(model, quant)
    batches = [torch.rand(4, 3, 16, 16)]
    with torch.no_grad():
        init_bounds(model, batches, ObserverSpec("dobi", dobi_steps=20))
        before = {n: m.bias.clone() for n, m in quant_modules(model) if m.bias is not None}
        assert script.correct_biases(model, fp, batches, 1.0) == len(before) > 0
        fp_modules, captured = dict(fp.named_modules()), {}  # cloned: IMDN's CCA applies an in-place ReLU next
        hooks = [fp_modules[n].register_forward_hook(lambda _, i, o, n=n: captured.__setitem__(n, (i[0], o.clone())))
                 for n in before]
        fp(batches[0])
        for h in hooks:
            h.remove()
        moved = 0
        for name, module in quant_modules(model):
            if name not in before:
                continue
            for q in module.input_quantizers:
                q.enabled = False
            x, out = captured[name]
            offset = (module(x) - out).mean(dim=(0, 2, 3))
            assert offset.abs().max() < 1e-4 * out.abs().max() + 1e-6
            moved += not torch.equal(module.bias, before[name])
        assert moved >= len(before) - 2  # the two CCA convs with one input channel quantize exactly


def test_an_unknown_group_is_refused_with_exit_code_2(project, monkeypatch, capsys):
    opt = write_yaml(project, "train.yml", train_options("dobi"))
    script = load_script("quant_sensitivity")
    with pytest.raises(SystemExit) as exc:
        _run(script, monkeypatch, "-opt", opt, "--groups", "all,no such group")
    assert exc.value.code == 2 and "no such group" in capsys.readouterr().err
    assert not (project / "results" / "sensitivity_tiny_dobi.md").exists()
