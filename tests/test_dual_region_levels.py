"""scripts/dual_region_levels.py: one OAQ initialisation, the dual-region grids at several bit-widths."""
from __future__ import annotations

import pytest
from conftest import load_script, write_yaml
from test_oaq import oaq_options


def _rows(path):
    return {int(r.split(" | ")[0].lstrip("| ")): r.split(" | ") for r in path.read_text().splitlines()
            if r.startswith("| ") and r[2].isdigit()}


def test_more_levels_never_raise_a_quantizers_own_input_error(project):
    opt = write_yaml(project, "train.yml", oaq_options("oaq"))
    load_script("dual_region_levels").main(["-opt", opt, "--bits", "2,3,4"])
    rows = _rows(project / "results" / "dual_region_levels_tiny_oaq.md")
    assert sorted(rows) == [2, 3, 4]
    # the paper's allocation: 3 dense points and no tail at 2 bits, the same dense points and one per tail at 3
    assert rows[2][1:3] == ["3", "0"] and rows[3][1:3] == ["3", "1"] and rows[4][1:3] == ["7", "3"]
    assert float(rows[2][5]) == pytest.approx(1.0)
    assert rows[3][6].startswith("0 of") and rows[4][6].startswith("0 of")  # a superset grid on the same bounds
    assert float(rows[4][5]) < 1.0


def test_bad_bits_are_refused_with_exit_code_2(project, capsys):
    opt = write_yaml(project, "train.yml", oaq_options("oaq"))
    script = load_script("dual_region_levels")
    assert script.run_cli(lambda: script.main(["-opt", opt, "--bits", "2,x"])) == 2
    assert "--bits" in capsys.readouterr().err
    assert not (project / "results").exists()
