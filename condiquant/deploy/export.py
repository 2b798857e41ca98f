"""Export a quantized checkpoint for deployment.

    python scripts/export.py -opt options/train/EMT_x4_2dquant.yml [--set ...] [--format packed] [--out FILE]
    python scripts/export.py --checkpoint experiments/<name>/models/net_q_latest.pth --format packed

``onnx``: QuantizeLinear/DequantizeLinear graph for ONNX Runtime's integer kernels (``condiquant/deploy/
onnx_export.py``; zero points aligned to the integer grid first, ``--tile`` for window-attention archs,
``--quantize-outputs`` for 8-bit Q/DQ on the quantized layers' outputs so that the convolutions run as
QLinearConv, but for the ``--float-outputs`` layers whose output rounding costs most); prints the op types ONNX Runtime executes after its optimisations. Score it with test.py:
``network_g: {type: onnx, path: FILE}``.

``packed``: quantized weights as bit-packed b-bit integer codes plus their (l, u) per tensor or channel, the rest
FP32 (``condiquant/deploy/packed.py``); ``test.py`` scores the file like any checkpoint
(``path.pretrain_network_g: ....cqpack``) with outputs bit-identical to the fake-quant checkpoint. Prints the file
size beside its theoretical size, 32 (P - Q) + b Q bits + the scales.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from condiquant.config import ConfigError, apply_overrides, from_dict, load_yaml
from condiquant.deploy.packed import save_packed
from condiquant.options import QuantOptions, TrainOptions
from condiquant.quant.checkpoint import _load, build_quantized


def checkpoint_of(args: argparse.Namespace) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    if not args.opt:
        raise ConfigError("give -opt <train yml> or --checkpoint <net_q_*.pth>")
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    return Path("experiments") / opts.name / "models" / "net_q_latest.pth"


def main(args: argparse.Namespace) -> dict:
    ckpt = checkpoint_of(args)
    if not ckpt.is_file():
        raise ConfigError(f"{ckpt}: checkpoint not found (run train.py with these options first)")
    raw = _load(ckpt)
    if not isinstance(raw, dict) or "quant" not in raw:
        raise ConfigError(f"{ckpt}: not a quantized checkpoint (no 'quant' entry)")
    model = build_quantized(ckpt, raw["network_g"], str(ckpt)).eval()
    if args.format == "onnx":
        from condiquant.deploy.onnx_export import align_zero_points, export_onnx
        from condiquant.deploy.onnx_runtime import optimized_ops

        out = Path(args.out) if args.out else ckpt.with_suffix(".onnx")
        scale = int(raw["network_g"].get("upscale", 0)) or args.scale
        batches = None
        if args.quantize_outputs:  # output ranges from calibration crops (never a test set)
            import numpy as np

            from condiquant.data.calib import CalibrationImages
            from condiquant.options import CalibOptions

            c = CalibOptions()
            crops = CalibrationImages(c.roots, scale, c.val_fraction, c.split_seed, "calib").random_crops(
                c.num_patches, args.tile or c.patch_size, np.random.default_rng(0))
            batches = crops.split(c.chunk_size)
        export_onnx(align_zero_points(model), out, scale, args.tile, output_batches=batches,
                    float_outputs=args.float_outputs)
        report = {"checkpoint": str(ckpt), "onnx": str(out), "bytes": out.stat().st_size, "tile": args.tile,
                  "quantized_outputs": bool(args.quantize_outputs),
                  "optimized_ops": optimized_ops(out)}
        print(json.dumps(report, indent=1))
        return report
    out = Path(args.out) if args.out else ckpt.with_suffix(".cqpack")
    size = save_packed(out, model, raw["network_g"], from_dict(QuantOptions, raw["quant"], f"{ckpt}: quant"))
    report = {"checkpoint": str(ckpt), "packed": str(out), "packed_bytes": size.file_bytes,
              "theoretical_bytes": size.theoretical_bytes, "overhead": size.overhead, "params": size.params,
              "quantized_params": size.quantized, "fakequant_checkpoint_bytes": ckpt.stat().st_size}
    print(json.dumps(report, indent=1))
    return report
