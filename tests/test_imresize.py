"""The MATLAB-bicubic generator must reproduce the official benchmark LR files pixel for pixel."""
import numpy as np
import pytest

from condiquant.data.imresize import imresize_uint8, modcrop
from condiquant.data.paired import read_image


def _official_pairs(mirror):
    for ds in ("Set5", "Set14"):
        for s in (2, 3, 4):
            for lr in sorted((mirror / "benchmark" / ds / "LR_bicubic" / f"X{s}").glob("*.png")):
                yield ds, s, lr, mirror / "benchmark" / ds / "HR" / lr.name.replace(f"x{s}.png", ".png")


def test_all_official_set5_set14_lr_files_reproduced_exactly(mirror):
    pairs = list(_official_pairs(mirror))
    assert len(pairs) == 57
    for ds, s, lr_path, hr_path in pairs:
        ours = imresize_uint8(modcrop(read_image(hr_path), s), 1 / s)
        official = read_image(lr_path)
        assert ours.shape == official.shape, (ds, s, lr_path.name)
        assert np.array_equal(ours, official), f"{ds} x{s} {lr_path.name}: {(ours != official).sum()} pixels differ"


def test_constant_image_stays_constant_and_sizes_follow_ceil():
    img = np.full((13, 10, 3), 77, np.uint8)
    out = imresize_uint8(img, 1 / 3)
    assert out.shape == (5, 4, 3)
    assert (out == 77).all()


def test_rejects_non_uint8():
    with pytest.raises(TypeError):
        imresize_uint8(np.zeros((4, 4), np.float32), 0.5)
