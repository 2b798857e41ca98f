"""condiquant/figures.py (scripts/visual_compare.py): entries, crop box, enlargement, PSNR captions and the figure,
on synthetic images."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from condiquant import figures as vc
from condiquant import metrics
from condiquant.config import ConfigError


def synthetic(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_parse_entry():
    assert vc.parse_entry("2DQuant W2A2=a/b=c.pth") == ("2DQuant W2A2", Path("a/b=c.pth"))
    for bad in ("no-separator.yml", "=x.yml", "FP="):
        with pytest.raises(ConfigError, match="LABEL=FILE"):
            vc.parse_entry(bad)


def test_crop_box_takes_x_y_width_height_and_rejects_outside_boxes():
    img = synthetic()
    np.testing.assert_array_equal(vc.crop_box(img, (4, 2, 8, 6)), img[2:8, 4:12])
    for box in [(25, 0, 8, 6), (0, 15, 8, 6), (-1, 0, 4, 4), (0, 0, 0, 4)]:
        with pytest.raises(ConfigError, match="--box"):
            vc.crop_box(img, box)


def test_enlarge_is_nearest_neighbour():
    img = synthetic(2, 3)
    big = vc.enlarge(img, 3)
    assert big.shape == (6, 9, 3)
    np.testing.assert_array_equal(big[3:6, 6:9], np.broadcast_to(img[1, 2], (3, 3, 3)))


def test_panels_score_only_the_box():
    hr = synthetic()
    box = (4, 2, 8, 6)
    noisy = hr.copy()
    noisy[2:8, 4:12] = synthetic(6, 8, seed=1)
    outside = hr.copy()
    outside[12:, :] = 0  # differs from HR only outside the box
    panels = vc.make_panels(hr, [("Noisy", noisy), ("Outside", outside)], box)
    assert [p.label for p in panels] == ["HR", "Noisy", "Outside"]
    assert panels[0].psnr is None and panels[0].caption == "HR\nPSNR (Y, crop)"
    expected = metrics.psnr(noisy[2:8, 4:12], hr[2:8, 4:12], crop_border=0, y_channel=True)
    assert panels[1].psnr == pytest.approx(expected)
    assert panels[1].caption == f"Noisy\n{expected:.2f} dB"
    assert panels[2].psnr == float("inf")
    with pytest.raises(ValueError, match="differs from HR"):
        vc.make_panels(hr, [("Small", hr[:-1])], box)


def test_render_writes_a_png_laid_out_in_pixels(tmp_path):
    hr = synthetic()
    panels = vc.make_panels(hr, [("Copy", hr.copy())], (4, 2, 8, 6))
    out = tmp_path / "fig" / "grid.png"
    vc.render(hr, (4, 2, 8, 6), panels, 2, "synthetic", out)
    img = cv2.imread(str(out))
    # One row: cells 16x12 px + 42 px caption; overview 12 px high (30x20 shrunk to 18x12); 10 px padding.
    assert img.shape[:2] == (10 + 12 + 42, 2 * 10 + 18 + 2 * (16 + 10))
