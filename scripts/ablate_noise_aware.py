#!/usr/bin/env python3
"""Ablation of the noise-aware weight correction: ridge x calibration crops x parallel / sequential (x anchor).

    python scripts/ablate_noise_aware.py -opt options/train/IMDN_x4_2dquant.yml --set quant.w_bit=3 \\
        --set quant.a_bit=3 --name IMDN_x4_W3A3 [--ridges 1e-4 1e-3 1e-2 1e-1] [--num-patches 8 16 32] \\
        [--modes parallel sequential] [--set key=value ...]

The options' quantizers are attached and DOBI-initialised once (the activation bounds do not depend on the cell);
each cell corrects a copy of that network, refits its weight bounds with DOBI and scores Y-PSNR on the
calibration validation split (no DQC, to stay affordable; never a test set), beside the summed relative layer
error in-sample (calibration crops) and out-of-sample (held-out crops of the validation images). The calibration
crops grow with ``num_patches`` (the same seed: 8 crops are the first 8 of 16). Writes
``results/ablation_noise_aware_<name>.{md,json}`` and prints the best cell as the chosen defaults.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


from condiquant.cli import option_parser
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.engine.loop import validation_psnr
from condiquant.options import NoiseAwareOptions, TrainOptions
from condiquant.ptq import validation_context
from condiquant.transforms.conditioning import conditioning_layers
from condiquant.transforms.noise_aware import (collect_cross_grams, correct_layers, correct_model,
                                               skipped_layers)


def main() -> None:
    parser = option_parser("scripts/ablate_noise_aware.py")
    parser.add_argument("--ridges", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 1e-1])
    parser.add_argument("--num-patches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--modes", nargs="+", default=["parallel", "sequential"], choices=["parallel", "sequential"])
    parser.add_argument("--anchors", nargs="+", default=["w0"], choices=["w0", "zero"],
                        help="what the ridge pulls towards")
    parser.add_argument("--name", help="results name (default: the options' name)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    name = args.name or opts.name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    logger = logging.getLogger("ablate_noise_aware")
    out_dir = Path("results")
    ctx = validation_context(opts, args.opt, out_dir, logger)
    opts, fp, quant, calib, device = ctx.opts, ctx.fp_model, ctx.quant, ctx.calib, ctx.device

    tic = time.perf_counter()
    base = ctx.quantized_copy()
    ctx.init_bounds(base, "dobi")
    init_seconds = time.perf_counter() - tic
    c = opts.conditioning
    layers = conditioning_layers(fp, quant, c)
    skipped = skipped_layers(base, fp, layers)
    layers = {n: s for n, s in layers.items() if n not in skipped}
    seed, chunk = opts.calib.seed, opts.calib.chunk_size
    holdout = [b.to(device) for b in calib.val_crops(c.holdout_patches, c.patch_size,
                                                     np.random.default_rng(seed)).split(chunk)]
    fp_psnr, dobi_psnr = validation_psnr(fp, ctx), validation_psnr(base, ctx)
    logger.info("FP %.3f dB, DOBI %.3f dB on the calibration validation split", fp_psnr, dobi_psnr)

    cells: List[Dict[str, Any]] = []
    held_grams = None
    for n_patches in args.num_patches:
        crops = [b.to(device) for b in calib.random_crops(n_patches, c.patch_size,
                                                          np.random.default_rng(seed)).split(chunk)]
        grams = None
        for mode, anchor, ridge in itertools.product(args.modes, args.anchors, args.ridges):
            tic = time.perf_counter()
            model = copy.deepcopy(base)

            def refit(module: str) -> None:
                ctx.init_weight_bounds(model, [module])

            if mode == "parallel":
                if grams is None:
                    grams = collect_cross_grams(fp, base, layers, crops, ctx.input_range)
                if held_grams is None:
                    held_grams = collect_cross_grams(fp, base, layers, holdout, ctx.input_range)
                reports = correct_layers(model, layers, grams, held_grams, NoiseAwareOptions(ridge, anchor),
                                         refit)
            else:
                c_opts = replace(c, noise_aware=NoiseAwareOptions(ridge, anchor, sequential=True))
                reports = correct_model(model, fp, layers, c_opts, crops, holdout, ctx.input_range, refit,
                                        logger).layers
            cell = {"mode": mode, "num_patches": n_patches, "anchor": anchor, "ridge": ridge,
                    "rows": reports[0].calib_rows,
                    **{k: float(sum(getattr(r, k) for r in reports)) for k in (
                        "error_calib_before", "error_calib_after", "error_holdout_before",
                        "error_holdout_after")},
                    "val_psnr": validation_psnr(model, ctx), "seconds": time.perf_counter() - tic}
            cells.append(cell)
            logger.info("cell %s %d crops ridge %g (%s): %.3f dB, held-out error %.4g -> %.4g (%.1f s)",
                        mode, n_patches, ridge, anchor, cell["val_psnr"], cell["error_holdout_before"],
                        cell["error_holdout_after"], cell["seconds"])

    best = max(cells, key=lambda cell: cell["val_psnr"])
    q = f"W{quant.w_bit}A{quant.a_bit}"
    rows = [f"# Noise-aware correction ablation: {opts.network_g['type']} x{opts.scale} {q} (DOBI, no DQC)", "",
            f"`{command}`", "",
            f"Validation Y-PSNR on the calibration validation split ({len(calib.val_paths)} images, centre "
            f"{opts.calib.val_patch_size}px LR crops): FP {fp_psnr:.3f} dB, DOBI without correction "
            f"{dobi_psnr:.3f} dB (bounds {init_seconds:.1f} s). {len(layers)} layers corrected"
            + (f", {len(skipped)} skipped" if skipped else "") + f". Errors: summed over the layers of "
            f"||Xq W^T - X W0^T||_F / ||X W0^T||_F, in-sample on the calibration crops ({c.patch_size}px) and "
            f"held-out on {c.holdout_patches} validation crops; 'before' is W0 (sequential: on the inputs "
            f"of the quantized network whose earlier layers are already corrected).", "",
            "| mode | crops | positions | ridge towards | ridge | val PSNR (dB) | in-sample error before -> after | held-out error "
            "before -> after | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        rows.append(f"| {cell['mode']} | {cell['num_patches']} | {cell['rows']} | {cell['anchor']} | "
                    f"{cell['ridge']:g} | "
                    f"{cell['val_psnr']:.3f} | {cell['error_calib_before']:.4g} -> {cell['error_calib_after']:.4g} | "
                    f"{cell['error_holdout_before']:.4g} -> {cell['error_holdout_after']:.4g} | "
                    f"{cell['seconds']:.1f} |")
    chosen = {k: best[k] for k in ("mode", "num_patches", "anchor", "ridge")}
    rows += ["", f"Chosen (best validation PSNR): {chosen}"]
    text = "\n".join(rows)
    print(text)
    stem = out_dir / f"ablation_noise_aware_{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "options": asdict(opts), "fp_val_psnr": fp_psnr, "dobi_val_psnr": dobi_psnr,
         "skipped": skipped, "cells": cells, "chosen": best}, indent=1, default=str))


if __name__ == "__main__":
    main()
