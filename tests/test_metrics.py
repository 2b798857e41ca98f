import numpy as np
import pytest
from skimage.metrics import structural_similarity

from condiquant import metrics


def _pair(seed=0, shape=(37, 45, 3)):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    return a, b


def test_y_channel_is_bt601_with_offset_unrounded():
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)
    y = metrics.rgb_to_y(img)
    expected = 16 + np.array([65.481, 128.553, 24.966, (65.481 * 10 + 128.553 * 20 + 24.966 * 30) / 255])
    np.testing.assert_allclose(y[0], expected, rtol=0, atol=1e-12)


def test_psnr_matches_hand_computation_with_crop():
    a, b = _pair()
    crop = 3
    ya = 16 + (a.astype(float) @ np.array([65.481, 128.553, 24.966])) / 255
    yb = 16 + (b.astype(float) @ np.array([65.481, 128.553, 24.966])) / 255
    mse = np.mean((ya[crop:-crop, crop:-crop] - yb[crop:-crop, crop:-crop]) ** 2)
    assert metrics.psnr(a, b, crop) == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-10)
    assert metrics.psnr(a, a, crop) == float("inf")


def test_ssim_matches_scikit_image_gaussian_matlab_settings():
    a, b = _pair(1, (60, 52, 3))
    ya, yb = metrics.rgb_to_y(a)[4:-4, 4:-4], metrics.rgb_to_y(b)[4:-4, 4:-4]
    ref = structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255)
    assert metrics.ssim(a, b, crop_border=4) == pytest.approx(ref, abs=1e-9)
    assert metrics.ssim(a, a, crop_border=4) == pytest.approx(1.0, abs=1e-12)


def test_shape_mismatch_is_an_error():
    a, b = _pair()
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(a, b[:-1])
