#!/usr/bin/env python3
"""Does a dual-region (OAQ) activation grid get better with more bits? Same initial bounds, only the level count
changes.

    python scripts/dual_region_levels.py -opt options/train/EMT_x4_oaq.yml [--bits 2,3,4] [--set k=v ...]

The OAQ initialisation of the options (min/max l_a, u_a and the percentile breakpoint, as ``train.py`` starts SAFT)
is made once; then, for each bit-width, every dual-region quantizer is set to it and, with every other quantizer
(weights, uniform MatMul inputs) off, reported are: the calibration-validation PSNR (never a test set), and per
quantizer the mean squared error of its own FP input on the bound-initialisation crops, summarised as the median
ratio to the first bit-width and the count of quantizers whose error grew. Writes
``results/dual_region_levels_<name>.md``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from condiquant.cli import command_line, load_options, option_parser, run_cli
from condiquant.config import ConfigError
from condiquant.engine.loop import validation_psnr
from condiquant.options import TrainOptions
from condiquant.ptq import validation_context
from condiquant.quant.attach import named_quantizers
from condiquant.quant.dual_region import DualRegionQuantizer, region_points
from condiquant.runtime import setup_logger
from condiquant.transforms.conditioning import forward_with_input_hooks


def input_errors(model: torch.nn.Module, dual: Dict[str, DualRegionQuantizer], bits: List[int],
                 batches: list, input_range: float) -> Dict[int, Dict[str, float]]:
    """MSE of each dual-region quantizer on its FP input (every quantizer off), for each bit-width."""
    sums = {b: {n: 0.0 for n in dual} for b in bits}
    count = {n: 0 for n in dual}

    def record(name: str):
        def hook(q: DualRegionQuantizer, x: torch.Tensor) -> None:
            for b in bits:
                q.n_bits = b
                sums[b][name] += float(((q.quantize(x) - x) ** 2).sum())
            count[name] += x.numel()
        return hook

    forward_with_input_hooks(model, [(q, record(n)) for n, q in dual.items()], batches, input_range)
    return {b: {n: sums[b][n] / count[n] for n in dual if count[n]} for b in bits}


def main(argv: List[str]) -> None:
    parser = option_parser("scripts/dual_region_levels.py")
    parser.add_argument("--bits", default="2,3,4", help="comma-separated activation bit-widths (default 2,3,4)")
    args = parser.parse_args(argv)
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        raise ConfigError(f"--bits: not a comma-separated list of integers: {args.bits!r}") from None
    if any(b < 2 for b in bits):
        raise ConfigError(f"--bits: bit-widths must be >= 2: {args.bits!r}")
    command = command_line("scripts/dual_region_levels.py", argv)
    opts = load_options(TrainOptions, args.opt, args.set)
    out = Path("results") / f"dual_region_levels_{opts.name}.md"
    out.parent.mkdir(exist_ok=True)
    logger = setup_logger(out.with_suffix(".log"))
    ctx = validation_context(opts, args.opt, out.parent, logger)
    model = ctx.quantized_copy()
    quantizers = dict(named_quantizers(model))
    dual = {n: q for n, q in quantizers.items() if isinstance(q, DualRegionQuantizer)}
    if not dual:
        raise ConfigError(f"{args.opt}: quant.a_quantizer: no dual-region quantizers to compare")
    ctx.init_bounds(model, "dobi")
    with torch.no_grad():
        for q in quantizers.values():
            q.enabled = False
        errors = input_errors(model, dual, bits, ctx.calibration_batches(), ctx.input_range)
        for q in dual.values():
            q.enabled = True
        psnr = {}
        for b in bits:
            for q in dual.values():
                q.n_bits = b
            psnr[b] = validation_psnr(model, ctx)
            logger.info("dual-region inputs at %d bits: %.3f dB", b, psnr[b])
        fp_psnr = validation_psnr(ctx.fp_model, ctx)
    levels = ctx.quant.dual_region.levels
    first = bits[0]
    rows = []
    for b in bits:
        dense, tail = region_points(b, levels)
        ratio = np.array([errors[b][n] / max(errors[first][n], 1e-30) for n in errors[b]])
        grew = int((ratio > 1.0 + 1e-6).sum())
        rows.append(f"| {b} | {dense} | {tail} | {psnr[b]:.2f} | {psnr[b] - fp_psnr:+.2f} | {np.median(ratio):.3f} "
                    f"| {grew} of {len(ratio)} |")
    text = "\n".join([
        f"# Dual-region activation levels: {opts.name}", "",
        f"Produced by `{command}` (levels `{levels}`, breakpoint percentile {ctx.quant.dual_region.bp_percentile}). "
        f"One OAQ initialisation (bounds and breakpoints do not depend on the bit-width); only the {len(dual)} "
        f"dual-region quantizers enabled, at each bit-width in turn. PSNR on the calibration validation split "
        f"({len(ctx.calib.val_paths)} images), FP {fp_psnr:.2f} dB. Input error: each quantizer's MSE on its FP "
        f"input over the bound-initialisation crops, as a ratio to its error at {first} bits.", "",
        "| bits | dense points | points per tail | PSNR (dB) | vs FP | median error ratio | error grew |",
        "|---|---|---|---|---|---|---|", *rows])
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    raise SystemExit(run_cli(lambda: main(sys.argv[1:])))
