"""Python API: quantize any ``nn.Module`` and score it, without YAML.

    import condiquant
    qmodel, report = condiquant.quantize(model, condiquant.QuantConfig(w_bit=4, a_bit=4, method="2dquant"),
                                         calib=["datasets/calib/T91"], scale=4)
    condiquant.evaluate(qmodel, {"Set5": "datasets/benchmark/Set5/HR"}, scale=4)

It runs exactly the pipeline of ``train.py`` (the same methods, observers, training loop and calibration split)
on the given module: Linear / Conv2d layers are found by type and name patterns (``QuantConfig.placement``),
attention products through :class:`condiquant.archs.ops.MatMul` modules, and ``torch.matmul`` / ``@`` calls are
rewritten into such modules where the model traces with torch.fx (``rewrite_matmuls``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from condiquant.archs import user_model
from condiquant.archs.fx import rewrite_matmuls  # noqa: F401 (part of the API)
from condiquant.config import ConfigError, from_dict
from condiquant.data.calib import CalibrationImages
from condiquant.data.paired import PairedImageFolder
from condiquant.engine.loop import validation_psnr
from condiquant.options import DatasetOptions, TrainOptions, ValOptions
from condiquant.ptq import resolve_options
from condiquant.quant.attach import named_quantizers
from condiquant.runtime import configure, setup_logger

Folders = Union[str, Path, Sequence[Union[str, Path]]]


@dataclass
class QuantConfig:
    """What ``train.py`` reads from YAML, as keyword arguments: ``w_bit``, ``a_bit``, ``method`` and any section of
    :class:`condiquant.options.TrainOptions` as a dict (``quant``, ``dqc``, ``saft``, ``conditioning``, ``calib``,
    ``bound_init``, ``noisyquant``, ``recon``, ``pac``, ``ptq4vit``), e.g.
    ``QuantConfig(2, 2, dqc={"total_iter": 100}, quant={"placement": {"skip": ["head"]}})``."""

    w_bit: int = 4
    a_bit: int = 4
    method: str = "2dquant"
    quant: Dict[str, Any] = field(default_factory=dict)
    calib: Dict[str, Any] = field(default_factory=dict)
    dqc: Dict[str, Any] = field(default_factory=dict)
    saft: Dict[str, Any] = field(default_factory=dict)
    conditioning: Dict[str, Any] = field(default_factory=dict)
    bound_init: Dict[str, Any] = field(default_factory=dict)
    noisyquant: Dict[str, Any] = field(default_factory=dict)
    recon: Dict[str, Any] = field(default_factory=dict)
    pac: Dict[str, Any] = field(default_factory=dict)
    ptq4vit: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_threads: int = 0
    device: str = "auto"


def _roots(folders: Folders) -> List[str]:
    return [str(folders)] if isinstance(folders, (str, Path)) else [str(f) for f in folders]


def quantize(model: nn.Module, config: QuantConfig, calib: Folders, scale: int, out_dir: Union[str, Path] = None,
             name: str = "api", rewrite: bool = True) -> Tuple[nn.Module, Dict[str, Any]]:
    """Quantize a copy of ``model`` (FP, its weights loaded) with ``config.method`` on LR crops of the images in
    ``calib`` (folders of HR images; LR made MATLAB-exactly, a validation split held out by image). Returns the
    quantized model and a report (method, quantizers, seconds, calibration-validation PSNR FP vs quantized).
    ``out_dir`` (default ``experiments/<name>``) receives the training checkpoints of trained methods."""
    from condiquant.methods import METHODS
    from condiquant.methods.context import PTQContext

    fp = copy.deepcopy(model).eval()
    if rewrite and not isinstance(fp, torch.fx.GraphModule):
        fp = user_model(fp)
    for p in fp.parameters():
        p.requires_grad_(False)
    data = {"name": name, "scale": scale, "method": config.method,
            "network_g": {"type": f"{type(model).__module__}:{type(model).__name__}"},
            "quant": {"w_bit": config.w_bit, "a_bit": config.a_bit, **config.quant},
            "calib": {"roots": _roots(calib), **config.calib}, "dqc": config.dqc, "saft": config.saft,
            "conditioning": config.conditioning, "bound_init": config.bound_init, "noisyquant": config.noisyquant,
            "recon": config.recon, "pac": config.pac,
            "ptq4vit": config.ptq4vit, "manual_seed": config.seed,
            "num_threads": config.num_threads, "device": config.device}
    opts = from_dict(TrainOptions, data, "QuantConfig:")
    if opts.method not in METHODS:
        raise ConfigError(f"QuantConfig.method: unknown method {opts.method!r} (known: {', '.join(METHODS)})")
    device = configure(opts.device, opts.num_threads, opts.manual_seed)
    opts = resolve_options(opts, "QuantConfig")
    exp_dir = Path(out_dir) if out_dir is not None else Path("experiments") / name
    exp_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(exp_dir / "quantize.log")
    calib_images = CalibrationImages(opts.calib.roots, scale, opts.calib.val_fraction, opts.calib.split_seed,
                                     "QuantConfig.calib")
    ctx = PTQContext(opts, opts.quant, fp.to(device), calib_images, exp_dir, logger, device)
    tic = time.perf_counter()
    quantized = METHODS[opts.method](ctx).eval()
    report = {"method": opts.method, "w_bit": opts.quant.w_bit, "a_bit": opts.quant.a_bit,
              "quantizers": sum(1 for _ in named_quantizers(quantized)), "seconds": time.perf_counter() - tic,
              **ctx.summary, "fp_val_psnr": validation_psnr(ctx.fp_model, ctx), "placement": opts.quant.placement}
    if "val_psnr" not in report:  # trained methods measured their final model already
        report["val_psnr"] = validation_psnr(quantized, ctx)
    return quantized, report


@torch.no_grad()
def evaluate(model: nn.Module, datasets: Dict[str, Union[str, Path]], scale: int, crop_border: Optional[int] = None,
             device: str = "auto") -> Dict[str, Dict[str, float]]:
    """PSNR / SSIM on Y of ``model`` on HR folders (``{name: HR folder}``; LR generated MATLAB-exactly and cached
    beside, as test.py does), by test.py's protocol: ``{name: {"psnr": .., "ssim": ..}}``. A model that wants
    inputs in 0..255 says so with an ``input_range`` attribute, as the built-in archs do."""
    from condiquant.scoring import score_dataset

    dev = configure(device, 0)
    val = ValOptions(crop_border=crop_border)
    model = model.eval().to(dev)
    scores = {}
    for name, hr in datasets.items():
        data = PairedImageFolder(DatasetOptions(name=name, dataroot_gt=str(hr)), scale, f"evaluate {name}")
        score = score_dataset(model, data, scale, val, dev, None)
        scores[name] = {"psnr": score.psnr, "ssim": score.ssim}
    return scores
