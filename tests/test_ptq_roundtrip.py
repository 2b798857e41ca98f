"""train.py -> test.py on a tiny model and tiny calibration images, in seconds."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import NET, assert_quantized, load_script, train_options, write_yaml

from condiquant.cli import main_test, main_train

@pytest.mark.parametrize("method", ["minmax", "percentile", "dobi", "2dquant"])
def test_train_then_test_round_trip(project, method):
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options(method))]) == 0
    exp = project / "experiments" / f"tiny_{method}"
    ckpt = exp / "models" / "net_q_latest.pth"
    assert ckpt.is_file() and (exp / f"tiny_{method}.yml").is_file()
    assert_quantized(project, ckpt)
    test_opts = {"name": f"score_{method}", "scale": 2, "network_g": NET,
                 "path": {"pretrain_network_g": str(ckpt)},
                 "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test_opts)]) == 0
    report = json.loads((project / "results" / f"score_{method}" / "metrics.json").read_text())
    assert 5 < report["datasets"]["Bench"]["psnr"] < 60


def test_dqc_trains_only_bounds_and_resumes(project):
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 0
    exp = project / "experiments" / "tiny_2dquant"
    full = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    fp = torch.load(project / "fp.pth", weights_only=True)["params"]
    for key, value in fp.items():  # the FP weights are untouched
        torch.testing.assert_close(full[key], value)
    at2 = torch.load(exp / "models" / "net_q_2.pth", weights_only=True)["params"]
    assert any(not torch.equal(full[k], at2[k]) for k in full if k.endswith((".lower", ".upper")))
    # Resume from iteration 2 in the same folder: identical final bounds (deterministic under the seed).
    resumed = train_options("2dquant")
    resumed["path"]["resume_state"] = str(exp / "training_states" / "2.state")
    assert main_train(["-opt", write_yaml(project, "resume.yml", resumed)]) == 0
    again = torch.load(exp / "models" / "net_q_latest.pth", weights_only=True)["params"]
    for key in full:
        torch.testing.assert_close(again[key], full[key])


def test_existing_experiment_is_archived(project):
    opts = train_options("minmax")
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    names = sorted(p.name for p in (project / "experiments").iterdir())
    assert names[0] == "tiny_minmax" and names[1].startswith("tiny_minmax_archived_")


def test_unsupported_bits_is_a_one_line_error(project, capsys):
    opts = train_options("minmax")
    opts["quant"]["w_bit"] = 1
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    assert "quant.w_bit: unsupported bit-width 1" in capsys.readouterr().err


def _tiny_table(project, **extra):
    write_yaml(project, "train.yml", train_options("minmax"))
    write_yaml(project, "test.yml", {"name": "unused", "scale": 2, "network_g": NET,
                                     "path": {"pretrain_network_g": "fp.pth"},
                                     "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"},
                                                  "u": {"name": "Other", "dataroot_gt": "bench/HR"}}})
    # A variant row: another method's options with an override, run at W2A2 only.
    variant = {"method": "percentile", "overrides": {"bound_init.percentile": 90.0}, "bits": [2]}
    return write_yaml(project, "table.yml", {
        "name": "tiny_table", "train_opt": "train.yml", "test_opt": "test.yml", "seed_datasets": ["Bench"],
        "datasets": ["Bench", "Other"], "methods": ["minmax", "2dquant", "p90"], "bits": [4, 2], "seeds": [0, 1],
        "extra_seeds": [], "variants": {"p90": variant}, **extra})


def test_grid_runner_writes_table_with_seeds_and_resumes_from_cache(project):
    from condiquant.grid import run_table

    table = _tiny_table(project)
    md = run_table(table, [], "test").read_text()
    assert all(f"| {m} | {b} |" in md for m in ("minmax", "2dquant") for b in (4, 2))
    assert "| FP | 32 |" in md and "| Bicubic | 32 |" in md and "| p90 | 2 |" in md and "| p90 | 4 |" not in md
    assert "- row `p90`: method `percentile`" in md
    rows = {r["cell"]: r for r in json.loads((project / "results" / "tiny_table.json").read_text())["rows"]}
    assert rows["minmax_W4A4"]["seeds"] == [0] and rows["2dquant_W4A4"]["seeds"] == [0, 1]
    trained = rows["2dquant_W2A2"]
    assert {"val_psnr_mean", "val_psnr_std", "val_psnr_iter0"} <= set(trained)
    assert "psnr_std" in trained["scores"]["Bench"] and trained["scores"]["Other"]["seed"] in (0, 1)
    assert trained["budget"] == {"updates": 4, "batch": 2, "patch": 12}
    assert trained["deployable"] is True and trained["levels"] == {"weights": 4, "activations": 4}
    units = sorted((project / "results" / "tiny_table" / "cells" / "2dquant_W2A2").glob("*.json"))
    assert [u.name for u in units] == ["rest.json", "s0.json", "s1.json"]
    assert all({"key", "commit", "code"} <= set(json.loads(u.read_text())) for u in units)
    resolved = (project / "experiments" / "tiny_table_p90_W2A2_s0" / "tiny_table_p90_W2A2_s0.yml").read_text()
    assert "percentile: 90.0" in resolved and "method: percentile" in resolved
    # A second run only reads the cache: no experiment is calibrated again (none gets archived).
    run_table(table, [], "test")
    assert not any("archived" in p.name for p in (project / "experiments").iterdir())


def test_cached_table_computes_nothing_and_lists_pending_cells(project):
    from condiquant.grid import run_table

    table = _tiny_table(project, methods=["dobi"], bits=[4, 2], include_fp=False, include_bicubic=False)
    md = run_table(table, [], "test", cached=True).read_text()
    assert "Pending (not yet computed): dobi_W4A4, dobi_W2A2." in md and not (project / "experiments").exists()
    full = run_table(table, ["bits=[4]"], "test").read_text()
    md = run_table(table, [], "test", cached=True).read_text()
    assert "Pending (not yet computed): dobi_W2A2." in md
    assert [ln for ln in md.splitlines() if ln.startswith("| dobi | 4 |")] == \
        [ln for ln in full.splitlines() if ln.startswith("| dobi | 4 |")]


def test_grid_recomputes_cells_of_other_options_or_unbridged_code(project):
    from condiquant.grid import run_table

    table = _tiny_table(project, methods=["dobi"], bits=[4], include_fp=False, include_bicubic=False)
    run_table(table, [], "test")
    unit_path = project / "results" / "tiny_table" / "cells" / "dobi_W4A4" / "s0.json"
    first = json.loads(unit_path.read_text())
    # Other options (a different percentile does not touch dobi, but any option is part of the key): recomputed.
    run_table(table, ["train_overrides={bound_init.dobi_steps: 50}"], "test")
    second = json.loads(unit_path.read_text())
    assert second["key"] != first["key"]
    # Same options, a cell made by other code: recomputed unless a check bridged that code.
    unit_path.write_text(json.dumps({**second, "code": "0000", "val_psnr": -1.0}))
    run_table(table, ["train_overrides={bound_init.dobi_steps: 50}"], "test")
    assert json.loads(unit_path.read_text())["val_psnr"] == second["val_psnr"]
    (project / "results" / "tiny_table" / "bridges.json").write_text(json.dumps(
        [{"from_code": "0000", "to_code": second["code"], "ok": True, "checked": [], "command": "c"}]))
    unit_path.write_text(json.dumps({**second, "code": "0000", "val_psnr": -1.0}))
    run_table(table, ["train_overrides={bound_init.dobi_steps: 50}"], "test")
    assert json.loads(unit_path.read_text())["val_psnr"] == -1.0  # bridged: reused as is
    # A chain of agreeing bridges (older -> 0000 -> today's) stands too, and the table names both links;
    # a chain with a failed link does not.
    bridges = json.loads((project / "results" / "tiny_table" / "bridges.json").read_text())
    older = {"from_code": "older", "to_code": "0000", "ok": True, "checked": [], "command": "c0"}
    (project / "results" / "tiny_table" / "bridges.json").write_text(json.dumps(bridges + [older]))
    unit_path.write_text(json.dumps({**second, "code": "older", "val_psnr": -2.0}))
    md = run_table(table, ["train_overrides={bound_init.dobi_steps: 50}"], "test").read_text()
    assert json.loads(unit_path.read_text())["val_psnr"] == -2.0
    assert "code older bridged to 0000 by `c0`" in md and f"code 0000 bridged to {second['code']}" in md
    (project / "results" / "tiny_table" / "bridges.json").write_text(json.dumps(bridges + [{**older, "ok": False}]))
    run_table(table, ["train_overrides={bound_init.dobi_steps: 50}"], "test")
    assert json.loads(unit_path.read_text())["val_psnr"] == second["val_psnr"]  # recomputed


def test_check_reruns_cached_runs_and_bridges_old_code(project):
    from condiquant.grid import check, run_table

    table = _tiny_table(project, methods=["2dquant"], bits=[4], include_fp=False, include_bicubic=False)
    run_table(table, [], "test")
    cells = project / "results" / "tiny_table" / "cells" / "2dquant_W4A4"
    for seed in (0, 1):  # pretend older code made both runs
        path = cells / f"s{seed}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "code": "old"}))
    bridges_path = project / "results" / "tiny_table" / "bridges.json"
    before = bridges_path.read_text() if bridges_path.is_file() else "[]"
    assert check(table, [], 1, "spot", seed=0)["agree"]
    assert json.loads(bridges_path.read_text()) == json.loads(before)  # one re-run is a spot check, not a bridge
    report = check(table, [], 2, "check", seed=0)
    assert report["agree"] and len(report["checked"]) == 2
    assert all(abs(r["diff"]) < 1e-9 for r in report["checked"])  # one thread, same seed: identical
    bridges = json.loads((project / "results" / "tiny_table" / "bridges.json").read_text())
    assert bridges[-1]["from_code"] == "old" and bridges[-1]["ok"]


def test_check_first_bridges_the_code_that_lets_most_runs_stand(tmp_path):
    from condiquant.grid import Cache, next_bridge

    (tmp_path / "bridges.json").write_text(json.dumps(
        [{"from_code": "older", "to_code": "old", "ok": True, "checked": [], "command": "c"}]))
    cache = Cache(tmp_path)
    # "older" has more runs, but bridging "old" lets those stand too (through the existing older -> old link)
    assert next_bridge(cache, ["old", "old", "older", "older", "older"]) == "old"
    assert next_bridge(cache, ["older", "other", "other"]) == "other"
    assert next_bridge(cache, [cache.code]) is None


def test_unknown_table_row_is_a_one_line_error(project):
    from condiquant.config import ConfigError
    from condiquant.grid import load_table

    table = write_yaml(project, "table.yml", {"name": "t", "train_opt": "train.yml", "test_opt": "test.yml",
                                          "methods": ["2dquant", "oqa"]})
    with pytest.raises(ConfigError, match="methods: 'oqa' is neither a method"):
        load_table(str(table), [])


def test_bench_methods_times_rows_in_one_run(project):
    bench = load_script("bench_methods")
    write_yaml(project, "train.yml", train_options("minmax"))
    table = write_yaml(project, "table.yml", {"name": "tb", "train_opt": "train.yml", "test_opt": "unused.yml",
                                          "methods": ["minmax", "2dquant"]})
    bench.main(argparse.Namespace(opt=str(table), methods=["minmax", "2dquant"], bits=4, set=[]), "bench")
    md = (project / "results" / "bench_methods_tb_W4A4.md").read_text()
    rows = [line.split(" | ") for line in md.splitlines() if line.startswith(("| minmax", "| 2dquant"))]
    assert [r[0] for r in rows] == ["| minmax", "| 2dquant"] and rows[0][3] == "1.00"
    summary = json.loads((project / "experiments" / "bench_tb_2dquant_W4A4" / "summary.json").read_text())
    assert summary["method"] == "2dquant" and rows[1][2] == f"{summary['seconds']:.0f}"


def test_resume_with_other_options_is_refused_naming_the_keys(project, capsys):
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 0
    exp = project / "experiments" / "tiny_2dquant"
    before = sorted(p.name for p in exp.rglob("*"))
    capsys.readouterr()
    changed = train_options("2dquant", lr=0.5)
    changed["quant"]["a_bit"] = 3
    changed["path"]["resume_state"] = "auto"
    assert main_train(["-opt", write_yaml(project, "resume.yml", changed)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dqc.lr" in err and "quant.a_bit" in err and "4.state" in err
    assert sorted(p.name for p in exp.rglob("*")) == before


def test_dqc_feature_norms_are_detached():
    from condiquant.methods.dqc import feature_loss

    s = {"b": torch.randn(2, 3, 4, 4, requires_grad=True)}
    t = {"b": torch.randn(2, 3, 4, 4)}
    feature_loss(s, t, "paper").backward()
    s_flat = s["b"].detach().flatten(1)
    norm = s_flat.norm(dim=1, keepdim=True)
    diff = s_flat / norm - t["b"].flatten(1) / t["b"].flatten(1).norm(dim=1, keepdim=True)
    # d/ds of ||s/c - t_n|| / n with the norm c held constant
    expected = (diff / diff.norm(dim=1, keepdim=True) / norm / s_flat.shape[1] / 2).view_as(s["b"])
    torch.testing.assert_close(s["b"].grad, expected)


def test_scaled_adam_multiplies_each_elements_step():
    from condiquant.engine.loop import ScaledAdam

    p1, p2 = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    plain = torch.optim.Adam([p1], lr=0.1)
    scaled = ScaledAdam([p2], [torch.tensor([1.0, 3.0])], lr=0.1)
    for _ in range(3):
        for p, o in ((p1, plain), (p2, scaled)):
            o.zero_grad()
            (p * torch.tensor([1.0, -2.0])).sum().backward()
            o.step()
    steps1, steps2 = p1.detach() - torch.tensor([1.0, 2.0]), p2.detach() - torch.tensor([1.0, 2.0])
    torch.testing.assert_close(steps2, steps1 * torch.tensor([1.0, 3.0]))


def test_run_key_ignores_fields_left_at_their_default_only():
    from condiquant.config import from_dict
    from condiquant.grid import explicit, run_key
    from condiquant.options import TestOptions, TrainOptions

    train = from_dict(TrainOptions, train_options("2dquant"), "t")
    test = from_dict(TestOptions, {"name": "x", "scale": 2, "network_g": NET,
                                   "datasets": {"t": {"name": "B", "dataroot_gt": "b"}}}, "t")
    assert "noisy_bias" not in explicit(train)["quant"] and explicit(train)["dqc"]["total_iter"] == 4
    same = from_dict(TrainOptions, {**train_options("2dquant"), "saft": {"lr": 1e-3}}, "t")  # = the default
    other = from_dict(TrainOptions, train_options("2dquant", lr=0.02), "t")
    assert run_key(train, test, 0, 1) == run_key(same, test, 0, 1) != run_key(other, test, 0, 1)
    assert run_key(train, test, 0, 1) != run_key(train, test, 1, 1) != run_key(train, test, 1, 2)
