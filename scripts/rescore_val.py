#!/usr/bin/env python3
"""Calibration-validation PSNR of existing quantized checkpoints on today's validation split (e.g. checkpoints made
by older code, to compare their seed spread with today's on one measure).

    python scripts/rescore_val.py -opt options/train/IMDN_x4_2dquant.yml CKPT [CKPT ...]

The train options give the arch, scale and calibration split; prints one JSON line per checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


from condiquant.cli import option_parser, run_cli
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.engine.loop import validation_psnr
from condiquant.options import TrainOptions
from condiquant.ptq import validation_context
from condiquant.quant.checkpoint import build_quantized


def main(args: argparse.Namespace) -> None:
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    ctx = validation_context(opts, args.opt, Path("."), logging.getLogger("condiquant"))
    for ckpt in args.checkpoints:
        model = build_quantized(Path(ckpt), opts.network_g, ckpt).eval().to(ctx.device)
        print(json.dumps({"checkpoint": ckpt, "val_psnr": validation_psnr(model, ctx),
                          "val_images": len(ctx.calib.val_paths)}), flush=True)


if __name__ == "__main__":
    parser = option_parser("scripts/rescore_val.py")
    parser.add_argument("checkpoints", nargs="+")
    raise SystemExit(run_cli(lambda: main(parser.parse_args())))
