#!/usr/bin/env python3
"""Deployment benchmark, measured in one run: latency and throughput of FP32 torch, fake-quant torch (weights
quantized every forward, and once at load), FP32 ONNX Runtime and integer ONNX Runtime; file sizes (FP32,
fake-quant checkpoint, packed, theoretical, ONNX); PSNR of the integer model against the fake-quant model of the
same bits on Set5 and Urban100.

    python scripts/bench_deploy.py -opt options/train/IMDN_x4_2dquant.yml --bits 8 [--w-bits 4] [--method dobi]
        [--tile 64] [--repeats 3] [--threads 2] [--datasets Set5 Urban100] [--set key=value ...]

The quantized model is calibrated here with ``--method`` (default DOBI: no training, so the benchmark measures
the runtime, not a method). Sizes of the inputs: a Set5-sized (128x128 LR) and an Urban100-sized (256x192 LR)
image. ``--w-bits``: weights at other bits than activations (W4A8: 4-bit weight grids run by the same int8 kernels,
since ONNX Runtime has no sub-byte convolution; the packed file carries the 4-bit size). ``--set
quant.w_symmetric=true``: 8-bit weights on grids with zero point 0, which ONNX Runtime runs with its faster
symmetric kernels (below 8 bits the exported zero point is 0 on any grid). Writes
``results/bench_deploy_<arch>_x<scale>_W<w>A<b>.json`` and its ``.md`` twin, naming this command.
"""
from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from condiquant.cli import load_options, option_parser, run_cli
from condiquant.config import ConfigError
from condiquant.data.paired import PairedImageFolder
from condiquant.deploy.onnx_export import align_zero_points, export_onnx
from condiquant.deploy.onnx_runtime import OnnxSR, optimized_ops
from condiquant.deploy.packed import save_packed
from condiquant.methods import METHODS
from condiquant.options import DatasetOptions, TrainOptions, ValOptions
from condiquant.ptq import validation_context
from condiquant.quant.attach import freeze_weights
from condiquant.quant.checkpoint import save_quantized
from condiquant.scoring import score_dataset

SIZES = {"Set5-sized": (128, 128), "Urban100-sized": (192, 256)}


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``fn(x)`` over ``repeats`` runs after one warm-up."""
    fn(x)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def main(args, command: str) -> dict:
    if "Set5" not in args.datasets:
        raise ConfigError("--datasets: must include Set5 (the report's psnr_int8 / psnr_fakequant)")
    wb = args.w_bits or args.bits
    opts = load_options(TrainOptions, args.opt, args.set + [f"quant.w_bit={wb}", f"quant.a_bit={args.bits}",
                                                             f"method={args.method}", f"num_threads={args.threads}"])
    work = Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    ctx = validation_context(opts, args.opt, work, logging.getLogger("condiquant"))
    fp = ctx.fp_model
    fq = METHODS[opts.method](ctx).eval()
    align_zero_points(fq)  # the grid the ONNX model computes on
    r = ctx.input_range
    frozen = freeze_weights(copy.deepcopy(fq))
    calib = [b for b in ctx.calibration_batches()]
    arch, s, b = opts.network_g["type"], opts.scale, args.bits
    fp_onnx = export_onnx(fp, work / "fp.onnx", s, args.tile)  # no quantizer: a plain float graph
    int_onnx = export_onnx(fq, work / "int.onnx", s, args.tile, output_batches=calib, float_outputs=args.float_outputs)
    runners = {"FP32 torch": lambda x: fp(x * r) / r, "fake-quant torch": lambda x: fq(x * r) / r,
               "fake-quant torch, weights frozen": lambda x: frozen(x * r) / r,
               "FP32 ONNX Runtime": OnnxSR(fp_onnx, args.threads), "INT ONNX Runtime": OnnxSR(int_onnx, args.threads)}
    latency = {}
    with torch.no_grad():
        for size, (h, w) in SIZES.items():
            x = torch.rand(1, 3, h, w)
            latency[size] = {name: timed(fn, x, args.repeats) for name, fn in runners.items()}
    size = save_packed(work / "q.cqpack", fq, opts.network_g, ctx.quant)
    save_quantized(work / "q.pth", fq, opts.network_g, ctx.quant)
    psnr = {}
    val = ValOptions()
    for name in args.datasets:
        data = PairedImageFolder(DatasetOptions(name=name, dataroot_gt=f"datasets/benchmark/{name}/HR",
                                                dataroot_lq=f"datasets/benchmark/{name}/LR_bicubic/X{s}",
                                                filename_tmpl=f"{{}}x{s}"), s, name)
        psnr[name] = {"fakequant": score_dataset(frozen, data, s, val, ctx.device).psnr,
                      "int": score_dataset(runners["INT ONNX Runtime"], data, s, val, ctx.device).psnr}
    big = latency["Urban100-sized"]  # the ratios are taken on the larger input
    report = {"command": command, "model": f"{arch}_x{s}", "bits": b, "w_bits": wb, "method": opts.method, "threads": args.threads,
              "w_symmetric": ctx.quant.w_symmetric,
              "latency_s": latency, "throughput_img_per_s": {k: {n: 1 / t for n, t in v.items()}
                                                           for k, v in latency.items()},
              "int8_speedup_vs_fp32_torch": big["FP32 torch"] / big["INT ONNX Runtime"],
              "fakequant_over_fp_time": {"before": big["fake-quant torch"] / big["FP32 torch"],
                                         "after": big["fake-quant torch, weights frozen"] / big["FP32 torch"]},
              "packed_bytes": size.file_bytes, "theoretical_bytes": size.theoretical_bytes,
              "fakequant_checkpoint_bytes": (work / "q.pth").stat().st_size, "onnx_bytes": int_onnx.stat().st_size,
              "optimized_ops": optimized_ops(int_onnx), "float_outputs": runners["INT ONNX Runtime"].meta["float_outputs"],
              "psnr_int8": psnr["Set5"]["int"], "psnr_fakequant": psnr["Set5"]["fakequant"], "psnr": psnr}
    out = Path("results") / f"bench_deploy_{arch}_x{s}_W{wb}A{b}"
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Deployment benchmark: {arch} x{s} W{wb}A{b} ({opts.method})", "",
             f"`{command}`: {args.threads} threads, "
             f"median of {args.repeats} after a warm-up; integer model with 8-bit outputs of the quantized "
             f"layers but {len(report['float_outputs'])} float ones ({', '.join(report['float_outputs']) or '-'}: "
             f"`--float-outputs`, those whose rounding costs most on calibration crops).", "",
             "| runner | " + " | ".join(f"{k} s/img" for k in SIZES) + " | x FP32 torch (Urban100-sized) |",
             "|---|---|---|---|"]
    for name in runners:
        lines.append(f"| {name} | " + " | ".join(f"{latency[k][name]:.3f}" for k in SIZES)
                     + f" | {big['FP32 torch'] / big[name]:.2f} |")
    lines += ["", f"Sizes: packed {size.file_bytes} B (theoretical {size.theoretical_bytes:.0f} B), fake-quant "
              f"checkpoint {report['fakequant_checkpoint_bytes']} B, ONNX {report['onnx_bytes']} B.",
              "PSNR (Y): " + "; ".join(f"{n} integer {v['int']:.3f} vs fake-quant {v['fakequant']:.3f} dB"
                                       for n, v in psnr.items()) + ".",
              f"Ops ONNX Runtime runs: {report['optimized_ops']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    parser = option_parser("scripts/bench_deploy.py")
    parser.add_argument("--bits", type=int, default=8, help="activation bits (and weight bits without --w-bits)")
    parser.add_argument("--w-bits", type=int, default=None, help="weight bits, if not --bits")
    parser.add_argument("--method", default="dobi")
    parser.add_argument("--tile", type=int, default=None, help="fixed LR tile for window-attention archs")
    parser.add_argument("--float-outputs", type=int, default=2,
                        help="quantized layers whose outputs stay float (those whose 8-bit rounding costs most)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=["Set5", "Urban100"],
                        help="PSNR of the integer and the fake-quant model on these (Set5 is always needed)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_deploy.py", *sys.argv[1:]])
    raise SystemExit(run_cli(lambda: main(args, command)))
