#!/usr/bin/env python3
"""Ablation of CondiQuant's weight conditioning: regularizer x lam / kappa_max x K x layer set.

    python scripts/ablate_conditioning.py -opt options/train/IMDN_x4_2dquant.yml --set quant.w_bit=3 \\
        --set quant.a_bit=3 --name IMDN_x4_W3A3 \\
        [--regularizers shrink kappa_bound] [--lams 1e-4 1e-3 1e-2] [--kappa-maxes 10 30 100] [--iters 20 100] \\
        [--layer-sets linear all] [--set key=value ...]

Each cell conditions an FP copy, attaches the options' quantizers, initialises bounds with DOBI (no DQC, to stay
affordable on a CPU) and scores Y-PSNR on the calibration validation split (never a test set), with the summed
relative layer-output change on held-out validation crops and the PSNR of the conditioned FP network (what the
conditioning alone costs). A "none" cell (DOBI alone) is the reference. The layer Grams do not depend on the
cell, so they are collected once. Layer sets: ``linear`` = the Linear layers and the 1x1 convolutions (per-position
linear maps; all an IMDN has of them; for EMT, whose quantized convs are all 1x1, the same set as ``all``), ``all`` =
every Linear and Conv2d the placement quantizes; both are also restricted by the options' ``conditioning.layers``.
Writes
``results/ablation_conditioning_<name>.{md,json}`` and prints the best cell as the chosen defaults.
"""
from __future__ import annotations

import copy
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch.nn as nn


from condiquant.cli import option_parser
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.engine.loop import validation_psnr
from condiquant.options import ConditioningOptions, TrainOptions
from condiquant.ptq import validation_context
from condiquant.transforms.conditioning import condition_layers, conditioning_layers, gather_inputs


def layer_sets(model: nn.Module, layers: Dict[str, int], wanted: List[str]) -> Dict[str, Dict[str, int]]:
    """name -> layers (name -> output chunks); a set identical to an earlier one is dropped."""
    def per_position(name: str) -> bool:
        module = model.get_submodule(name)
        return isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1)

    candidates = {"linear": {n: s for n, s in layers.items() if per_position(n)}, "all": dict(layers)}
    out: Dict[str, Dict[str, int]] = {}
    for key in wanted:
        chosen = candidates[key]
        if chosen and all(chosen != seen for seen in out.values()):
            out[key] = chosen
        else:
            print(f"layer set {key!r} skipped: {'empty' if not chosen else 'same layers as an earlier set'}")
    return out


def main() -> None:
    parser = option_parser("scripts/ablate_conditioning.py")
    parser.add_argument("--regularizers", nargs="+", default=["shrink", "kappa_bound"],
                        choices=["shrink", "kappa_bound"])
    # lam is relative to the data term divided by lambda_max(X^T X) (see conditioning.py): 1e-3 already moves
    # layer outputs by ~1-5%, 1e-1 by ~20-50% on EMT/IMDN.
    parser.add_argument("--lams", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2], help="shrink: lam values")
    parser.add_argument("--kappa-maxes", nargs="+", type=float, default=[10.0, 30.0, 100.0],
                        help="kappa_bound: kappa_max values")
    parser.add_argument("--iters", nargs="+", type=int, default=[20, 100], help="K values")
    parser.add_argument("--layer-sets", nargs="+", default=["linear", "all"], choices=["linear", "all"])
    parser.add_argument("--name", help="results name (default: the options' name)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    name = args.name or opts.name
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    logger = logging.getLogger("ablate_conditioning")
    out_dir = Path("results")
    ctx = validation_context(opts, args.opt, out_dir, logger)
    opts, fp, quant, calib, device = ctx.opts, ctx.fp_model, ctx.quant, ctx.calib, ctx.device

    base = replace(opts.conditioning, targets=["Linear", "Conv2d"])
    sets = layer_sets(fp, conditioning_layers(fp, quant, base), args.layer_sets)
    seed = opts.calib.seed
    chunk = opts.calib.chunk_size
    c = opts.conditioning
    crops = calib.random_crops(c.num_patches, c.patch_size, np.random.default_rng(seed))
    held = calib.val_crops(c.holdout_patches, c.patch_size, np.random.default_rng(seed))
    union = {n for layers in sets.values() for n in layers}
    inputs = gather_inputs(fp, sorted(union), [b.to(device) for b in crops.split(chunk)],
                           [b.to(device) for b in held.split(chunk)], ctx.input_range)
    logger.info("Grams of %d layers in %.1f s (%s skipped)", len(inputs.grams), inputs.seconds, len(inputs.skipped))

    cells: List[Dict[str, Any]] = [{"regularizer": "none"}]
    for set_name in sets:
        for k in args.iters:
            for reg in args.regularizers:
                for value in (args.lams if reg == "shrink" else args.kappa_maxes):
                    cells.append({"regularizer": reg, "lam": value if reg == "shrink" else c.lam,
                                  "kappa_max": value if reg == "kappa_bound" else c.kappa_max, "iters": k,
                                  "layer_set": set_name})
    fp_psnr = validation_psnr(fp, ctx)
    for cell in cells:
        tic = time.perf_counter()
        model = copy.deepcopy(fp)
        if cell["regularizer"] != "none":
            layers = {n: s for n, s in sets[cell["layer_set"]].items() if n in inputs.grams}
            cell_opts: ConditioningOptions = replace(c, regularizer=cell["regularizer"], lam=cell["lam"],
                                                     kappa_max=cell["kappa_max"], iters=cell["iters"])
            reports = condition_layers(model, layers, inputs.grams, inputs.holdout, cell_opts)
            cell.update(matrices=len(reports), conditioned_fp_psnr=validation_psnr(model, ctx),
                        sum_change_holdout=float(sum(r.change_holdout for r in reports)),
                        max_change_holdout=float(max(r.change_holdout for r in reports)),
                        median_kappa_before=float(np.median([r.kappa_before for r in reports])),
                        median_kappa_after=float(np.median([r.kappa_after for r in reports])),
                        max_kappa_before=float(max(r.kappa_before for r in reports)),
                        max_kappa_after=float(max(r.kappa_after for r in reports)),
                        solve_seconds=float(sum(r.seconds for r in reports)))
        ctx.init_bounds(ctx.quantize(model), "dobi")
        cell["val_psnr"] = validation_psnr(model, ctx)
        cell["seconds"] = time.perf_counter() - tic
        logger.info("cell %s: %.3f dB (%.1f s)", {k: v for k, v in cell.items() if k in (
            "regularizer", "lam", "kappa_max", "iters", "layer_set")}, cell["val_psnr"], cell["seconds"])

    # CondiQuant's premise is that conditioning keeps every layer's output: a cell that moves some held-out layer
    # output by more than conditioning.tolerance is not a candidate, whatever its PSNR.
    conditioned = [cell for cell in cells
                   if cell["regularizer"] != "none" and cell["max_change_holdout"] <= c.tolerance]
    best = max(conditioned, key=lambda cell: cell["val_psnr"]) if conditioned else None
    q = f"W{quant.w_bit}A{quant.a_bit}"
    rows = [f"# Conditioning ablation: {opts.network_g['type']} x{opts.scale} {q} (DOBI, no DQC)", "",
            f"`{command}`", "",
            f"Validation Y-PSNR on the calibration validation split ({len(calib.val_paths)} images, centre "
            f"{opts.calib.val_patch_size}px LR crops); FP {fp_psnr:.3f} dB. Grams: {c.num_patches} crops of "
            f"{c.patch_size}px ({inputs.seconds:.1f} s); held-out changes on {c.holdout_patches} validation crops. "
            f"Layer sets: " + "; ".join(f"{k} = {len(v)} modules" for k, v in sets.items()) + ".", "",
            "| regularizer | lam | kappa_max | K | layers | val PSNR (dB) | FP conditioned (dB) | sum held-out change "
            "| max change | median kappa before -> after | max kappa before -> after | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        if cell["regularizer"] == "none":
            rows.append(f"| none (DOBI) | | | | | {cell['val_psnr']:.3f} | {fp_psnr:.3f} | 0 | 0 | | | "
                        f"{cell['seconds']:.1f} |")
            continue
        param = f"{cell['lam']:g} | " if cell["regularizer"] == "shrink" else f" | {cell['kappa_max']:g}"
        rows.append(f"| {cell['regularizer']} | {param} | {cell['iters']} | {cell['layer_set']} | "
                    f"{cell['val_psnr']:.3f} | {cell['conditioned_fp_psnr']:.3f} | {cell['sum_change_holdout']:.3g} | "
                    f"{cell['max_change_holdout']:.3g} | {cell['median_kappa_before']:.4g} -> "
                    f"{cell['median_kappa_after']:.4g} | {cell['max_kappa_before']:.4g} -> "
                    f"{cell['max_kappa_after']:.4g} | {cell['seconds']:.1f} |")
    if best is not None:
        param = "lam" if best["regularizer"] == "shrink" else "kappa_max"
        chosen = {k: best[k] for k in ("regularizer", param, "iters", "layer_set")}
        rows += ["", f"Chosen defaults (best validation PSNR among cells whose max held-out change is within "
                     f"the tolerance {c.tolerance}): {chosen}"]
    text = "\n".join(rows)
    print(text)
    stem = out_dir / f"ablation_conditioning_{name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "options": asdict(opts), "fp_val_psnr": fp_psnr, "gram_seconds": inputs.seconds,
         "layer_sets": {k: sorted(v) for k, v in sets.items()}, "skipped": inputs.skipped, "cells": cells,
         "chosen": best}, indent=1, default=str))


if __name__ == "__main__":
    main()
