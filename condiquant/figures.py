"""Visual comparison figure: the same HR-space box cropped from HR, bicubic and each network's SR output.

    python scripts/visual_compare.py --image datasets/benchmark/Set5/HR/butterfly.png --scale 4 \\
        --box 112 112 64 64 --entry FP=options/test/IMDN_x4.yml \\
        --entry "2DQuant W2A2=experiments/imdn_x4_2dquant_W2A2/models/net_q_latest.pth" \\
        --network options/test/IMDN_x4.yml --out docs/figures/visual_IMDN_x4_butterfly.png [--zoom 4]

An entry ``LABEL=FILE`` is a test options file (its network, weights and ``val`` padding and tiling are used) or
a checkpoint, float or quantized, run with the ``network_g`` and ``val`` of the ``--network`` test options file.
HR and bicubic panels are always included. The LR input is made from the HR image with MATLAB-exact bicubic
(identical to the benchmark LR files). Each crop is enlarged by nearest neighbour and captioned with its PSNR on
Y over the box (no border crop); the full HR image with the box drawn on it comes first. Writes one PNG.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


from condiquant import metrics
from condiquant.config import ConfigError, from_dict, load_yaml
from condiquant.data.imresize import imresize_uint8, modcrop
from condiquant.data.paired import read_image
from condiquant.inference import super_resolve
from condiquant.options import TestOptions
from condiquant.runtime import configure
from condiquant.scoring import build_model, to_uint8

Box = Tuple[int, int, int, int]  # x, y, width, height in HR pixels
_OPTION_SUFFIXES = (".yml", ".yaml")


@dataclass
class Panel:
    label: str
    crop: np.ndarray  # the box of this image, HxWx3 uint8
    psnr: Optional[float]  # Y-PSNR over the box against HR; None for HR itself

    @property
    def caption(self) -> str:
        return f"{self.label}\n" + ("PSNR (Y, crop)" if self.psnr is None else f"{self.psnr:.2f} dB")


def parse_entry(text: str) -> Tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise ConfigError(f"--entry {text!r}: expected LABEL=FILE (a test options file or a checkpoint)")
    return label, Path(path)


def crop_box(img: np.ndarray, box: Box) -> np.ndarray:
    x, y, w, h = box
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > img.shape[1] or y + h > img.shape[0]:
        raise ConfigError(f"--box {x} {y} {w} {h}: not inside the {img.shape[1]}x{img.shape[0]} image "
                          f"(after cropping HR to a multiple of the scale)")
    return img[y:y + h, x:x + w]


def enlarge(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: every pixel becomes a factor x factor block."""
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def make_panels(hr: np.ndarray, outputs: Sequence[Tuple[str, np.ndarray]], box: Box) -> List[Panel]:
    """HR first, then one panel per (label, full-size output), all cropped to ``box``."""
    reference = crop_box(hr, box)
    panels = [Panel("HR", reference, None)]
    for label, img in outputs:
        if img.shape != hr.shape:
            raise ValueError(f"{label}: output {img.shape} differs from HR {hr.shape}")
        crop = crop_box(img, box)
        panels.append(Panel(label, crop, metrics.psnr(crop, reference, crop_border=0, y_channel=True)))
    return panels


def render(hr: np.ndarray, box: Box, panels: Sequence[Panel], zoom: int, title: str, out: Path) -> None:
    """The full HR image with the box, then the enlarged crops in one or two rows; written as PNG.

    Laid out in pixels so that every enlarged crop is drawn 1:1 (uniform nearest-neighbour blocks).
    """
    rows = 1 if len(panels) <= 4 else 2
    cols = math.ceil(len(panels) / rows)
    x, y, w, h = box
    crop_w, crop_h = w * zoom, h * zoom
    pad, caption, dpi = 10, 42, 100  # pixels; the caption holds two lines of 9-point text
    cell_h = crop_h + caption
    fit = (rows * cell_h - caption) / hr.shape[0]  # the overview spans the rows of crops
    fit = math.floor(fit) if fit >= 1 else fit  # an integer enlargement keeps its pixels uniform
    full_w, full_h = round(hr.shape[1] * fit), round(hr.shape[0] * fit)
    width, height = 2 * pad + full_w + cols * (crop_w + pad), pad + rows * cell_h
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)

    def add_axes(left: int, top: int, w_px: int, h_px: int, image: np.ndarray, label: str,
                 interpolation: str = "nearest"):
        ax = fig.add_axes((left / width, 1 - (top + h_px) / height, w_px / width, h_px / height))
        ax.imshow(image, interpolation=interpolation)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(label, fontsize=9)
        return ax

    overview = add_axes(pad, pad, full_w, full_h, hr, title, "nearest" if fit >= 1 else "antialiased")
    overview.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="red", linewidth=1.5))
    for i, panel in enumerate(panels):
        row, col = divmod(i, cols)
        add_axes(2 * pad + full_w + col * (crop_w + pad), pad + row * cell_h, crop_w, crop_h,
                 enlarge(panel.crop, zoom), panel.caption)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)


def _test_options(path: Path) -> TestOptions:
    return from_dict(TestOptions, load_yaml(path), f"{path}:")


def super_resolve_entry(label: str, path: Path, network: Optional[Path], lr: np.ndarray, scale: int,
                        device: torch.device) -> np.ndarray:
    """SR output (uint8 RGB) of one entry: a test options file, or a checkpoint run with ``network``."""
    if path.suffix in _OPTION_SUFFIXES:
        opts, source = _test_options(path), str(path)
    else:
        if network is None:
            raise ConfigError(f"--entry {label}={path}: a checkpoint needs --network (a test options file)")
        base = _test_options(network)
        opts, source = replace(base, path=replace(base.path, pretrain_network_g=str(path))), str(network)
    if opts.scale != scale:
        raise ConfigError(f"{source}: scale {opts.scale} differs from --scale {scale}")
    model = build_model(opts, source, device)
    lq = torch.from_numpy(lr).permute(2, 0, 1)[None].float().div(255.0).to(device)
    return to_uint8(super_resolve(model, lq, scale, opts.val.window_pad, opts.val.tile, opts.val.tile_overlap))


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(prog="condiquant-compare", description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True, type=Path, help="HR image")
    parser.add_argument("--scale", required=True, type=int)
    parser.add_argument("--box", required=True, type=int, nargs=4, metavar=("X", "Y", "W", "H"),
                        help="crop box in HR pixels")
    parser.add_argument("--entry", action="append", default=[], metavar="LABEL=FILE",
                        help="test options file or checkpoint; repeatable, shown in this order")
    parser.add_argument("--network", type=Path, help="test options file whose network_g/val run checkpoint entries")
    parser.add_argument("--zoom", type=int, default=4, help="nearest-neighbour enlargement of the crops")
    parser.add_argument("--out", required=True, type=Path, help="output PNG")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    entries = [parse_entry(e) for e in args.entry]
    device = configure(args.device, args.threads)
    hr = modcrop(read_image(args.image), args.scale)
    box: Box = tuple(args.box)
    crop_box(hr, box)  # a bad box fails before any network runs
    lr = imresize_uint8(hr, 1.0 / args.scale)
    outputs = [("Bicubic", imresize_uint8(lr, args.scale))]
    outputs += [(label, super_resolve_entry(label, path, args.network, lr, args.scale, device))
                for label, path in entries]
    panels = make_panels(hr, outputs, box)
    render(hr, box, panels, args.zoom, f"{args.image.stem} x{args.scale}", args.out)
    for panel in panels[1:]:
        print(f"{panel.label}: {panel.psnr:.2f} dB (Y, box)")
    print(f"written to {args.out}")


