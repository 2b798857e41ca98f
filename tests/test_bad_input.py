"""Bad input: exit code 2, one line naming the file or key, and nothing already written is lost."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import NET, train_options, write_yaml

from condiquant.cli import main_test, main_train
from condiquant.data.paired import write_image


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and all(n in err for n in needles), err
    return err


def score_options(**changes) -> dict:
    return {"name": "score", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": "fp.pth"},
            "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}, **changes}


@pytest.fixture
def scored(project):
    assert main_test(["-opt", write_yaml(project, "test.yml", score_options())]) == 0
    return project / "results" / "score"


@pytest.fixture
def trained(project):
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 0
    return project / "experiments" / "tiny_2dquant"


def test_lr_hr_mismatch_leaves_the_previous_results(project, scored, capsys):
    before = snapshot(project / "results")
    lr = project / "bench" / "LR_bicubic" / "X2" / "b0x2.png"
    write_image(lr, np.zeros((5, 5, 3), np.uint8))
    assert main_test(["-opt", write_yaml(project, "test.yml", score_options())]) == 2
    one_line_error(capsys, "bench/LR_bicubic/X2/b0x2.png", "does not match HR")
    assert snapshot(project / "results") == before


def test_corrupt_lr_leaves_the_previous_results(project, scored, capsys):
    before = snapshot(project / "results")
    lr = project / "bench" / "LR_bicubic" / "X2" / "b1x2.png"
    lr.write_bytes(b"not a png")
    assert main_test(["-opt", write_yaml(project, "test.yml", score_options())]) == 2
    one_line_error(capsys, "bench/LR_bicubic/X2/b1x2.png", "cannot read image")
    assert snapshot(project / "results") == before


def test_corrupt_calibration_image_leaves_the_previous_experiment(project, trained, capsys):
    before = snapshot(project / "experiments")
    (project / "calib" / "A" / "c3.png").write_bytes(b"\x89PNG broken")
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 2
    one_line_error(capsys, "c3.png", "cannot read image")
    assert snapshot(project / "experiments") == before


def test_stale_calibration_lr_cache_is_rebuilt(project, trained):
    cache = next((project / "calib" / "LR_bicubic" / "X2" / "A").glob("*.png"))
    write_image(cache, np.zeros((3, 3, 3), np.uint8))
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 0
    from condiquant.data.paired import read_image
    assert read_image(cache).shape[:2] != (3, 3)


@pytest.mark.parametrize("change,needle", [
    ({"scale": 0}, "scale: must be a positive integer"),
    ({"scale": 3}, "network_g.upscale: 2 differs from scale 3"),
    ({"num_threads": -1}, "num_threads: must be >= 0"),
])
def test_bad_model_options_in_both_scripts(project, capsys, change, needle):
    train = {**train_options("minmax"), **change}
    assert main_train(["-opt", write_yaml(project, "train.yml", train)]) == 2
    one_line_error(capsys, needle)
    assert main_test(["-opt", write_yaml(project, "test.yml", score_options(**change))]) == 2
    one_line_error(capsys, needle)


def test_truncated_checkpoint_in_test_py(project, trained, capsys):
    ckpt = trained / "models" / "net_q_latest.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    opts = score_options(path={"pretrain_network_g": str(ckpt)})
    assert main_test(["-opt", write_yaml(project, "test.yml", opts)]) == 2
    one_line_error(capsys, str(ckpt), "not a readable torch checkpoint")


def test_truncated_training_state_is_refused_on_resume(project, trained, capsys):
    (trained / "training_states" / "99.state").write_bytes(b"half a file")
    before = snapshot(project / "experiments")
    opts = train_options("2dquant")
    opts["path"]["resume_state"] = "auto"
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 2
    one_line_error(capsys, "99.state", "not a readable training state")
    assert snapshot(project / "experiments") == before


def test_malformed_override_and_unwritable_output(project, capsys):
    path = write_yaml(project, "test.yml", score_options())
    assert main_test(["-opt", path, "--set", "val.tile=[1"]) == 2
    one_line_error(capsys, "override 'val.tile'", "invalid YAML")
    (project / "results").write_text("a file where the results folder should be")
    assert main_test(["-opt", path]) == 2
    one_line_error(capsys, "results/score", "cannot create the output folder")


def test_unknown_top_level_key_names_the_file_once(project, capsys):
    assert main_test(["-opt", write_yaml(project, "test.yml", score_options(sclae=2))]) == 2
    err = one_line_error(capsys, "test.yml: unknown key 'sclae'")
    assert "::" not in err


def test_rerun_archives_the_tensorboard_folder_too(project, trained):
    assert main_train(["-opt", write_yaml(project, "train.yml", train_options("2dquant"))]) == 0
    names = sorted(p.name for p in (project / "tb_logger").iterdir())
    assert names[0] == "tiny_2dquant" and names[1].startswith("tiny_2dquant_archived_")
