#!/usr/bin/env python3
"""The rotation pass on one model, measured in one run (no training, never a test set):

    python scripts/bench_rotation.py -opt options/train/IMDN_x4_2dquant.yml --bits 4 2 [--set k=v ...]

1. the pass's own time and its per-site decisions (sites rotated, summed relative error without / with);
2. the calibration-validation PSNR of DOBI-initialised quantized models without and with the rotations, per bits
   (the same crops, observer and placement; the rotations are chosen for each bit-width);
3. the online transforms' share of inference time on one Urban100-sized LR input (256 x 192): the rotated network
   against the same network without rotations, FP and fake-quant with frozen weights (median of 5 rounds after a
   warm-up, the four networks interleaved in every round).

Writes ``results/bench_rotation_<name>.md`` and ``.json``.
"""
from __future__ import annotations

import copy
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from condiquant.cli import option_parser, run_cli
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.engine.loop import validation_psnr
from condiquant.options import TrainOptions
from condiquant.ptq import validation_context
from condiquant.quant.attach import freeze_weights
from condiquant.runtime import setup_logger
from condiquant.transforms.rotation import rotate_model


def _median_seconds(models: dict, x: torch.Tensor, repeats: int = 5) -> dict:
    """Median forward time of each model, the models interleaved in every round (drifts hit them alike)."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(repeats):
            for k, m in models.items():
                tic = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


def main(args, command: str) -> None:
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    out_dir = Path("results")
    out_dir.mkdir(exist_ok=True)
    logger = setup_logger(out_dir / f"bench_rotation_{opts.name}.log")
    ctx = validation_context(opts, args.opt, out_dir, logger)
    r = ctx.opts.conditioning.rotate
    c = ctx.opts.conditioning
    crops = ctx.calib.random_crops(r.num_patches, r.patch_size, np.random.default_rng(r.seed)).to(ctx.device)
    holdout = [b.to(ctx.device) for b in ctx.calib.val_crops(c.holdout_patches, c.patch_size,
                                                              np.random.default_rng(ctx.opts.calib.seed)).split(2)]
    result = {"command": command, "threads": torch.get_num_threads(), "bits": {}}
    timed = {}  # the first bit-width's networks, for the timing
    with torch.no_grad():
        for bits in args.bits:
            ctx.quant = replace(ctx.quant, w_bit=bits, a_bit=bits)
            model = copy.deepcopy(ctx.fp_model)
            tic = time.perf_counter()
            report = rotate_model(model, ctx.quant, r, crops, holdout, ctx.input_range, logger)
            seconds = time.perf_counter() - tic
            nets = {"fp_plain": ctx.fp_model, "fp_rotated": copy.deepcopy(model)}
            psnr = {}
            for label, net in (("plain", copy.deepcopy(ctx.fp_model)), ("rotated", model)):
                ctx.init_bounds(ctx.quantize(net), "dobi")
                psnr[label] = validation_psnr(net.eval(), ctx)
                nets[f"fq_{label}"] = net
            timed = timed or nets
            result["bits"][bits] = {
                "pass_seconds": seconds, "output_change": report.output_change,
                "online_sites": sum(s.kind == "online" for s in report.sites),
                "rotated_online": sum(s.rotated and s.kind == "online" for s in report.sites),
                "attention_sites": sum(s.kind != "online" for s in report.sites),
                "rotated_attention": sum(s.rotated and s.kind != "online" for s in report.sites),
                "error_without": sum(s.error_before for s in report.sites),
                "error_with": sum(s.error_after if s.rotated else s.error_before for s in report.sites),
                "val_psnr_dobi": psnr, "fp_val_psnr": validation_psnr(ctx.fp_model, ctx)}
            logger.info("W%dA%d: %s", bits, bits, result["bits"][bits])
        x = torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(0)).to(ctx.device) * ctx.input_range
        result["timing"] = _median_seconds({k: freeze_weights(net).eval() if k.startswith("fq") else net.eval()
                                            for k, net in timed.items()}, x)
    name = ctx.opts.name
    (out_dir / f"bench_rotation_{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Rotation pass: {name}", "", f"`{command}` — {result['threads']} thread(s), one process; DOBI bounds, "
             "no training; PSNR on the calibration validation split (never a test set).", "",
             "| bits | pass (s) | online rotated | attention operands rotated | summed rel. error without -> with | "
             "val PSNR DOBI plain | val PSNR DOBI rotated | FP val |", "|---|---|---|---|---|---|---|---|"]
    for bits, b in result["bits"].items():
        lines.append(f"| W{bits}A{bits} | {b['pass_seconds']:.1f} | {b['rotated_online']}/{b['online_sites']} | "
                     f"{b['rotated_attention']}/{b['attention_sites']} | {b['error_without']:.3f} -> "
                     f"{b['error_with']:.3f} | {b['val_psnr_dobi']['plain']:.3f} | "
                     f"{b['val_psnr_dobi']['rotated']:.3f} | {b['fp_val_psnr']:.3f} |")
    t = result["timing"]
    lines += ["", f"Online transforms' share of inference time (one 256x192 LR input, W{args.bits[0]}A{args.bits[0]} "
              "rotations, median of 5 interleaved rounds after a warm-up):", "", "| network | plain (s) | rotated (s) | share |",
              "|---|---|---|---|"]
    for kind, label in (("fp", "FP"), ("fq", "fake-quant, frozen weights")):
        share = 1 - t[f"{kind}_plain"] / t[f"{kind}_rotated"]
        lines.append(f"| {label} | {t[f'{kind}_plain']:.3f} | {t[f'{kind}_rotated']:.3f} | {100 * share:.1f}% |")
    (out_dir / f"bench_rotation_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parse(argv):
    parser = option_parser("scripts/bench_rotation.py")
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    return parser.parse_args(argv)


if __name__ == "__main__":
    ns = parse(sys.argv[1:])
    cmd = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_rotation.py", *sys.argv[1:]])
    raise SystemExit(run_cli(lambda: main(ns, cmd)))
