"""Super-resolve a folder of images with an exported ONNX model in ONNX Runtime (tiled when it was exported at a
fixed tile), without torch models or condiquant checkpoints.

    python scripts/infer_onnx.py --model experiments/<name>/models/net_q_latest.onnx --input DIR --output DIR \\
        [--threads N]

Writes ``<output>/<stem>.png`` for every image in ``--input``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from condiquant.config import ConfigError
from condiquant.data.paired import list_images, read_image, write_image
from condiquant.deploy.onnx_runtime import OnnxSR
from condiquant.scoring import to_uint8


def main(args: argparse.Namespace) -> None:
    model = OnnxSR(args.model, args.threads)
    folder = Path(args.input)
    if not folder.is_dir():
        raise ConfigError(f"--input: folder not found: {folder}")
    paths = list_images(folder)
    if not paths:
        raise ConfigError(f"--input: no images in {folder}")
    out = Path(args.output)
    for path in tqdm(paths, desc=f"x{model.scale} ONNX Runtime"):
        lr = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None].contiguous().float().div(255.0)
        write_image(out / f"{path.stem}.png", to_uint8(model(lr)))
    print(f"{len(paths)} images -> {out}")
