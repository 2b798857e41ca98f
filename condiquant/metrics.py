"""PSNR and SSIM on the Y channel, the protocol of the SR literature (BasicSR / 2DQuant / CondiQuant tables).

Inputs are uint8 RGB images (HxWx3) or already-computed Y planes (HxW, float). Y is BT.601 with the +16
offset and is *not* rounded (MATLAB's ``rgb2ycbcr`` on uint8 would round it and shift PSNR by ~0.01 dB).
``crop_border`` pixels are removed on every side before scoring.
"""
from __future__ import annotations

import cv2
import numpy as np

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y (16..235 scale) of a uint8 RGB image, as float64, not rounded."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    return img.astype(np.float64) @ _Y_WEIGHTS + 16.0


def _prepare(img1: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool):
    if img1.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img1.shape} vs {img2.shape}")
    if y_channel and img1.ndim == 3:
        img1, img2 = rgb_to_y(img1), rgb_to_y(img2)
    else:
        img1, img2 = img1.astype(np.float64), img2.astype(np.float64)
    if crop_border > 0:
        img1 = img1[crop_border:-crop_border, crop_border:-crop_border]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border]
    return img1, img2


def psnr(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """Peak signal-to-noise ratio in dB for a 255 peak; ``inf`` for identical images."""
    a, b = _prepare(img1, img2, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one plane: 11x11 Gaussian window (sigma 1.5), statistics on the valid region only."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = cv2.getGaussianKernel(11, 1.5)
    window = g @ g.T

    def filt(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]  # drop the border where the window leaves the image

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """Structural similarity (Wang et al. 2004), averaged over channels when not on Y."""
    a, b = _prepare(img1, img2, crop_border, y_channel)
    if a.ndim == 2:
        return _ssim_plane(a, b)
    return float(np.mean([_ssim_plane(a[..., c], b[..., c]) for c in range(a.shape[2])]))
