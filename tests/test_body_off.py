"""The "body off" reference: a module's output zeroed at test time, and the table row built on it."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import NET, write_yaml

from condiquant.archs import build_network
from condiquant.cli import main_test
from condiquant.config import ConfigError
from condiquant.scoring import zero_outputs


def test_zeroed_long_skip_branch_leaves_head_and_tail_only():
    model = build_network(NET).eval()
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        full = model(x)
        zero_outputs(model, ["LR_conv"], "t")
        off = model(x)
        expected = model.upsampler(model.fea_conv(x))  # IMDN: upsampler(LR_conv(...) + fea)
    torch.testing.assert_close(off, expected, rtol=0, atol=0)
    assert not torch.allclose(off, full)
    zero_outputs(model, ["upsampler"], "t")  # changes the shape: not a residual branch
    with pytest.raises(ConfigError, match="'upsampler' maps"):
        model(x)


def test_unknown_module_is_a_one_line_error_before_anything_is_written(project, capsys):
    opts = {"name": "off", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": "fp.pth"},
            "zero_outputs": ["LR_convv"], "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", opts)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "zero_outputs: 'LR_convv' is not a module of IMDN" in err
    assert not (project / "results").exists()


def test_table_row_fp_body_off_is_scored_on_validation_too(project):
    from condiquant.grid import check, load_table, run_table
    from test_ptq_roundtrip import _tiny_table

    table = _tiny_table(project, methods=["2dquant"], bits=[4], body_off="LR_conv")
    md = run_table(table, [], "test").read_text()
    rows = {r["cell"]: r for r in json.loads((project / "results" / "tiny_table.json").read_text())["rows"]}
    off, fp = rows["FP_body_off"], rows["FP"]
    assert off["seeds"] == [0] and off["bits"] == 32 and "`FP_body_off`: the FP model with the output of `LR_conv`" in md
    assert off["val_psnr_mean"] != off["fp_val_psnr"] == rows["2dquant_W4A4"]["fp_val_psnr"]
    assert set(off["scores"]) == {"Bench", "Other"} and off["scores"]["Bench"]["psnr_mean"] != \
        fp["scores"]["Bench"]["psnr_mean"]
    # --check re-runs trained runs only (a reference row has nothing to re-calibrate)
    report = check(table, [], 5, "check", seed=0)
    assert {r["cell"] for r in report["checked"]} == {"2dquant_W4A4"}
    with pytest.raises(ConfigError, match="table.yml body_off: 'body' is not a module of IMDN"):
        load_table(table, ["body_off=body"])
