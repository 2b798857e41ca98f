"""Paired HR/LR benchmark folders, paired by file name, with LR generated MATLAB-exactly when absent."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import cv2
import numpy as np
from tqdm import tqdm

from condiquant.config import ConfigError
from condiquant.data.imresize import imresize_uint8, modcrop
from condiquant.options import DatasetOptions

IMG_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


def read_image(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB (grey images are replicated, as BasicSR's 'color' flag does)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ConfigError(f"{path}: cannot read image (missing, corrupt or unsupported format)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_image(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image atomically (a partly written cache file would poison later runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write image")
    os.replace(tmp, path)


def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTS and not p.name.startswith("."))


@dataclass
class ImagePair:
    name: str
    lq: np.ndarray  # HxWx3 uint8 RGB
    gt: np.ndarray  # (H*s)x(W*s)x3 uint8 RGB, cropped to LR size x scale


class PairedImageFolder:
    """HR images of ``dataroot_gt`` with their LR counterparts in ``dataroot_lq``."""

    def __init__(self, opt: DatasetOptions, scale: int, where: str, root: Path = Path(".")):
        self.name = opt.name
        self.scale = scale
        self.gt_dir = root / opt.dataroot_gt
        if not self.gt_dir.is_dir():
            raise ConfigError(f"{where}.dataroot_gt: folder not found: {self.gt_dir}")
        self.lq_dir = (root / opt.dataroot_lq) if opt.dataroot_lq else self.gt_dir.parent / "LR_bicubic" / f"X{scale}"
        self.gt_paths = list_images(self.gt_dir)
        if not self.gt_paths:
            raise ConfigError(f"{where}.dataroot_gt: no images in {self.gt_dir}")
        self.tmpl = opt.filename_tmpl
        missing = [p for p in self.gt_paths if self._find_lq(p) is None]
        if missing:
            if not opt.generate_lq:
                raise ConfigError(f"{where}.dataroot_lq: {len(missing)} LR files missing in {self.lq_dir} "
                                  f"(first: {self._lq_name(missing[0])}); set generate_lq: true to make them")
            self._generate(missing)

    def _lq_name(self, gt_path: Path) -> str:
        return self.tmpl.format(gt_path.stem, scale=self.scale) + ".png"

    def _find_lq(self, gt_path: Path) -> Optional[Path]:
        stem = self.tmpl.format(gt_path.stem, scale=self.scale)
        for ext in (".png", gt_path.suffix):
            cand = self.lq_dir / (stem + ext)
            if cand.is_file():
                return cand
        return None

    def _generate(self, gt_paths: List[Path]) -> None:
        for gt_path in tqdm(gt_paths, desc=f"{self.name}: MATLAB bicubic x{self.scale}", leave=False):
            hr = modcrop(read_image(gt_path), self.scale)
            write_image(self.lq_dir / self._lq_name(gt_path), imresize_uint8(hr, 1.0 / self.scale))

    def __len__(self) -> int:
        return len(self.gt_paths)

    def check(self) -> None:
        """Read every pair once (corrupt files, LR/HR size mismatches): callers do this before writing anything."""
        for i in range(len(self)):
            self[i]

    def __getitem__(self, i: int) -> ImagePair:
        gt_path = self.gt_paths[i]
        lq_path = self._find_lq(gt_path)
        if lq_path is None:
            raise ConfigError(f"{self.lq_dir}: LR file for {gt_path.name} disappeared")
        gt, lq = read_image(gt_path), read_image(lq_path)
        s = self.scale
        h, w = lq.shape[0] * s, lq.shape[1] * s
        # HR may exceed LR*s by less than s (modcrop); anything else is a wrong pairing or scale.
        if not (0 <= gt.shape[0] - h < s and 0 <= gt.shape[1] - w < s):
            raise ConfigError(f"{lq_path}: LR size {lq.shape[1]}x{lq.shape[0]} does not match HR {gt_path} "
                              f"({gt.shape[1]}x{gt.shape[0]}) at scale x{s}")
        return ImagePair(gt_path.stem, lq, gt[:h, :w])

    def __iter__(self) -> Iterator[ImagePair]:
        return (self[i] for i in range(len(self)))
