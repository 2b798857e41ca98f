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


def test_an_unknown_group_is_refused_with_exit_code_2(project, monkeypatch, capsys):
    opt = write_yaml(project, "train.yml", train_options("dobi"))
    script = load_script("quant_sensitivity")
    with pytest.raises(SystemExit) as exc:
        _run(script, monkeypatch, "-opt", opt, "--groups", "all,no such group")
    assert exc.value.code == 2 and "no such group" in capsys.readouterr().err
    assert not (project / "results" / "sensitivity_tiny_dobi.md").exists()
