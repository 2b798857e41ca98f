"""Calibration images (T91 + BSD200 by default): seeded LR crops, and a held-out validation split.

Test sets never enter here. LR versions are made MATLAB-exactly from modcropped HR and cached beside the HR
folders (``<root>/../LR_bicubic/X{s}/<root name>/``). The split is by image, so validation crops come from
images that calibration and distillation never see.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from condiquant.config import ConfigError
from condiquant.data.imresize import imresize_uint8, modcrop
from condiquant.data.paired import list_images, read_image, write_image


def _to_tensor(imgs: Sequence[np.ndarray]) -> torch.Tensor:
    # contiguous NCHW: a permuted (channels-last) input takes other conv kernels, whose float sums differ
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().float().div(255.0)


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations (2DQuant's hflip + rot90 augmentation)."""
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return np.rot90(img, int(rng.integers(4)))


class CalibrationImages:
    def __init__(self, roots: Sequence[str], scale: int, val_fraction: float, split_seed: int, where: str):
        paths: List[Path] = []
        for root in roots:
            folder = Path(root)
            if not folder.is_dir():
                raise ConfigError(f"{where}.roots: folder not found: {folder} (run scripts/fetch_assets.py)")
            paths += list_images(folder)
        if len(paths) < 2:
            raise ConfigError(f"{where}.roots: need at least 2 calibration images, found {len(paths)}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction: must be in (0, 1), got {val_fraction}")
        self.scale = scale
        order = np.random.default_rng(split_seed).permutation(len(paths))
        n_val = max(1, int(round(len(paths) * val_fraction)))
        self.val_paths = [paths[i] for i in sorted(order[:n_val])]
        self.train_paths = [paths[i] for i in sorted(order[n_val:])]
        self._lr_cache: dict = {}

    def _lr_path(self, hr_path: Path) -> Path:
        return hr_path.parent.parent / "LR_bicubic" / f"X{self.scale}" / hr_path.parent.name / f"{hr_path.stem}.png"

    def pair(self, hr_path: Path) -> Tuple[np.ndarray, np.ndarray]:
        """(LR, modcropped HR) as uint8 RGB; LR generated once and cached on disk."""
        if hr_path not in self._lr_cache:
            hr = modcrop(read_image(hr_path), self.scale)
            lr_path = self._lr_path(hr_path)
            try:
                lr = read_image(lr_path) if lr_path.is_file() else None
            except ConfigError:  # a corrupt cache file (the HR itself was read fine above)
                lr = None
            expected = (hr.shape[0] // self.scale, hr.shape[1] // self.scale)
            if lr is None or lr.shape[:2] != expected:  # missing, or a stale cache of another HR: make it anew
                lr = imresize_uint8(hr, 1.0 / self.scale)
                write_image(lr_path, lr)
            self._lr_cache[hr_path] = (lr, hr)
        return self._lr_cache[hr_path]

    def check(self) -> None:
        """Read (and cache) every image and its LR once: a corrupt file fails before anything is written."""
        for path in self.train_paths + self.val_paths:
            self.pair(path)

    def _eligible(self, paths: Sequence[Path], patch: int, split: str) -> List[Path]:
        ok = [p for p in paths if min(self.pair(p)[0].shape[:2]) >= patch]
        if not ok:
            raise ConfigError(f"calib: no {split} image has an LR side >= patch size {patch}")
        return ok

    def _crops(self, paths: Sequence[Path], n: int, patch: int, rng: np.random.Generator,
               augment: bool) -> torch.Tensor:
        crops = []
        for _ in range(n):
            lr = self.pair(paths[int(rng.integers(len(paths)))])[0]
            top = int(rng.integers(lr.shape[0] - patch + 1))
            left = int(rng.integers(lr.shape[1] - patch + 1))
            crop = lr[top: top + patch, left: left + patch]
            crops.append(np.ascontiguousarray(_augment(crop, rng) if augment else crop))
        return _to_tensor(crops)

    def random_pairs(self, n: int, patch: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` random LR crops (n, 3, patch, patch) of the training split with their HR crops, in 0..1."""
        paths = self._eligible(self.train_paths, patch, "calibration")
        lrs, hrs = [], []
        s = self.scale
        for _ in range(n):
            lr, hr = self.pair(paths[int(rng.integers(len(paths)))])
            top = int(rng.integers(lr.shape[0] - patch + 1))
            left = int(rng.integers(lr.shape[1] - patch + 1))
            lrs.append(np.ascontiguousarray(lr[top: top + patch, left: left + patch]))
            hrs.append(np.ascontiguousarray(hr[top * s: (top + patch) * s, left * s: (left + patch) * s]))
        return _to_tensor(lrs), _to_tensor(hrs)

    def random_crops(self, n: int, patch: int, rng: np.random.Generator, augment: bool = True) -> torch.Tensor:
        """``n`` random LR crops (n, 3, patch, patch) in 0..1 from the training split."""
        return self._crops(self._eligible(self.train_paths, patch, "calibration"), n, patch, rng, augment)

    def val_crops(self, n: int, patch: int, rng: np.random.Generator) -> torch.Tensor:
        """``n`` random LR crops (n, 3, patch, patch) in 0..1 from the validation split, not augmented."""
        return self._crops(self._eligible(self.val_paths, patch, "validation"), n, patch, rng, False)

    def val_pairs(self, patch: int) -> List[Tuple[torch.Tensor, np.ndarray]]:
        """Centre LR crops (1, 3, <=patch, <=patch) of the validation images with their HR crops."""
        out = []
        for path in self.val_paths:
            lr, hr = self.pair(path)
            h, w = min(patch, lr.shape[0]), min(patch, lr.shape[1])
            top, left = (lr.shape[0] - h) // 2, (lr.shape[1] - w) // 2
            s = self.scale
            out.append((_to_tensor([lr[top: top + h, left: left + w]]),
                        hr[top * s: (top + h) * s, left * s: (left + w) * s]))
        return out
