"""Super-resolve one image tensor: window padding and tiled inference for large inputs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.options import WindowPad


def _pad_amount(size: int, multiple: int, mode: WindowPad) -> int:
    if mode == "flip_plus_one":  # the official SwinIR script adds a window even when already divisible
        return (size // multiple + 1) * multiple - size
    return (-size) % multiple


def pad_to_window(x: torch.Tensor, multiple: int, mode: WindowPad) -> torch.Tensor:
    """Pad an NCHW tensor at the bottom/right so H and W are multiples of ``multiple``."""
    if mode == "none" or multiple <= 1:
        return x
    ph, pw = _pad_amount(x.shape[2], multiple, mode), _pad_amount(x.shape[3], multiple, mode)
    if mode == "reflect_next":
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    # Flip-concatenate: mirror the image (edge pixel repeated), which works for pads larger than the image too.
    x = torch.cat([x, torch.flip(x, [2])], 2)[:, :, : x.shape[2] + ph]
    return torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, : x.shape[3] + pw]


def _run(model: nn.Module, x: torch.Tensor, window: int, window_pad: WindowPad, input_range: float) -> torch.Tensor:
    h, w = x.shape[2:]
    padded = pad_to_window(x, window, window_pad)
    out = model(padded * input_range) / input_range
    scale = out.shape[2] // padded.shape[2]
    return out[:, :, : h * scale, : w * scale]


@torch.no_grad()
def super_resolve(model: nn.Module, lq: torch.Tensor, scale: int, window_pad: WindowPad = "none",
                  tile: int = 0, tile_overlap: int = 32) -> torch.Tensor:
    """SR output (N, C, H*s, W*s) for ``lq`` in 0..1; the model's ``input_range`` (1 or 255) is honoured.

    With ``tile > 0`` the LR image is cut into overlapping tiles whose outputs are averaged where they overlap,
    bounding memory on large images (the SwinIR official script's scheme).
    """
    window = int(getattr(model, "window_size", 1))
    input_range = float(getattr(model, "input_range", 1.0))
    n, c, h, w = lq.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return _run(model, lq, window, window_pad, input_range)
    stride = tile - tile_overlap
    rows = sorted({*range(0, max(h - tile, 0), stride), max(h - tile, 0)})
    cols = sorted({*range(0, max(w - tile, 0), stride), max(w - tile, 0)})
    out = lq.new_zeros(n, c, h * scale, w * scale)
    weight = torch.zeros_like(out)
    for top in rows:
        for left in cols:
            patch = lq[:, :, top: top + tile, left: left + tile]
            sr = _run(model, patch, window, window_pad, input_range)
            ys, xs = slice(top * scale, top * scale + sr.shape[2]), slice(left * scale, left * scale + sr.shape[3])
            out[:, :, ys, xs] += sr
            weight[:, :, ys, xs] += 1
    return out / weight
