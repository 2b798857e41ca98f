"""``train.py``: run the configured PTQ method and write ``experiments/<name>/``."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import yaml

from condiquant.archs import build_network, load_pretrained
from condiquant.config import ConfigError, to_dict
from condiquant.data.calib import CalibrationImages
from condiquant.methods import METHODS
from condiquant.methods.context import PTQContext
from condiquant.engine.loop import latest_state, validation_psnr
from condiquant.engine.rundir import open_run_dir
from condiquant.engine.state import atomic_write_text, check_resume_options, options_record, read_state
from condiquant.options import QuantOptions, TrainOptions
from condiquant.quant.attach import named_quantizers
from condiquant.quant.checkpoint import save_quantized
from condiquant.quant.presets import resolve_placement
from condiquant.runtime import configure


def _resume_path(opts: TrainOptions, exp_dir: Path, source: str) -> Optional[Path]:
    value = opts.path.resume_state
    if value is None:
        return None
    path = latest_state(exp_dir) if value == "auto" else Path(value)
    if value != "auto" and not path.is_file():
        raise ConfigError(f"{source} path.resume_state: file not found: {path}")
    return path


def load_fp_model(opts: TrainOptions, source: str, device: torch.device) -> nn.Module:
    """The pretrained FP network, frozen, in eval mode: the teacher and the starting point of every method."""
    fp = build_network(opts.network_g, f"{source} network_g")
    if not opts.path.pretrain_network_g:
        raise ConfigError(f"{source} path.pretrain_network_g: PTQ needs pretrained weights")
    load_pretrained(fp, opts.path.pretrain_network_g, opts.path.param_key_g, opts.path.strict_load_g)
    fp = fp.eval().to(device)
    for p in fp.parameters():
        p.requires_grad_(False)
    return fp


def resolved_quant(opts: TrainOptions, source: str) -> QuantOptions:
    """The quant options with the placement completed from the arch preset."""
    return replace(opts.quant, placement=resolve_placement(opts.network_g["type"], opts.quant.placement,
                                                           f"{source} quant.placement"))


def resolve_options(opts: TrainOptions, source: str) -> TrainOptions:
    """Every default that depends on other options made explicit: the placement, the calibration seed."""
    calib = opts.calib if opts.calib.seed is not None else replace(opts.calib, seed=opts.manual_seed)
    return replace(opts, quant=resolved_quant(opts, source), calib=calib)


def calibration_images(opts: TrainOptions, source: str) -> CalibrationImages:
    c = opts.calib
    return CalibrationImages(c.roots, opts.scale, c.val_fraction, c.split_seed, f"{source} calib")


def validation_context(opts: TrainOptions, source: str, out_dir: Path, logger: logging.Logger) -> PTQContext:
    """The context of a script that scores choices on the calibration validation split (ablations, sensitivity):
    FP model, resolved placement, calibration images; no experiment folder (outputs go to ``out_dir``)."""
    device = configure(opts.device, opts.num_threads, opts.manual_seed)
    fp = load_fp_model(opts, source, device)
    opts = resolve_options(opts, source)
    return PTQContext(opts, opts.quant, fp, calibration_images(opts, source), out_dir, logger, device)


def run_train(opts: TrainOptions, source: str, command: str = "") -> Path:
    """Calibrate; returns the path of the final quantized checkpoint."""
    device = configure(opts.device, opts.num_threads, opts.manual_seed)
    fp = load_fp_model(opts, source, device)
    resolved = resolve_options(opts, source)
    quant = resolved.quant
    calib = calibration_images(opts, source)
    calib.check()
    exp_dir = Path("experiments") / opts.name
    resume = _resume_path(opts, exp_dir, source)
    if resume is not None:  # before anything is written: a refused resume leaves the folder as it was
        check_resume_options(read_state(resume).get("options"), options_record(resolved), resume)
    logger = open_run_dir(exp_dir, "train", opts.name, resolved, command, resume=resume is not None, tb_logger=True)
    (exp_dir / f"{opts.name}.yml").write_text(f"# resolved options of: {command or source}\n"
                                              + yaml.safe_dump(to_dict(resolved), sort_keys=False))
    logger.info("calibration images: %d train, %d validation (%s)", len(calib.train_paths), len(calib.val_paths),
                ", ".join(opts.calib.roots))
    ctx = PTQContext(resolved, quant, fp, calib, exp_dir, logger, device, resume)
    tic = time.perf_counter()
    model = METHODS[opts.method](ctx)
    seconds = time.perf_counter() - tic
    final = exp_dir / "models" / "net_q_latest.pth"
    save_quantized(final, model, opts.network_g, quant)
    # seconds: the whole method, a resumed run's earlier part included
    summary = {"method": opts.method, **ctx.summary,
               "seconds": seconds + ctx.summary.get("seconds_before_resume", 0.0),
               "fp_val_psnr": validation_psnr(fp, ctx)}
    if "val_psnr" not in summary:  # a trained method reports its final model's (validated at the last iteration)
        summary["val_psnr"] = validation_psnr(model, ctx)
    summary.setdefault("val_psnr_iter0", summary["val_psnr"])  # untrained methods: the bounds are the start
    atomic_write_text(exp_dir / "summary.json", json.dumps(summary, indent=1))
    n_quant = sum(1 for _ in named_quantizers(model))
    logger.info("%s W%dA%d (%d quantizers) done in %.1f s; calibration-validation PSNR: FP %.3f dB, quantized "
                "%.3f dB (before training %.3f dB)", opts.method, quant.w_bit, quant.a_bit, n_quant,
                summary["seconds"], summary["fp_val_psnr"], summary["val_psnr"], summary["val_psnr_iter0"])
    logger.info("quantized checkpoint: %s\nscore it: python test.py -opt options/test/<arch>_x%d.yml --set "
                "path.pretrain_network_g=%s", final, opts.scale, final)
    return final
