"""Score a network on paired benchmarks: PSNR/SSIM on Y, per image and mean, written to ``results/<name>/``."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
import yaml
from tqdm import tqdm

from condiquant import metrics
from condiquant.archs import build_network, load_pretrained
from condiquant.config import ConfigError, to_dict
from condiquant.data.paired import PairedImageFolder, write_image
from condiquant.deploy.packed import load_packed
from condiquant.engine.rundir import open_run_dir
from condiquant.inference import super_resolve
from condiquant.options import TestOptions, ValOptions
from condiquant.quant.attach import freeze_weights
from condiquant.quant.checkpoint import build_quantized, quant_options_of
from condiquant.runtime import configure

_REFERENCES = Path(__file__).with_name("references.yml")


@dataclass
class DatasetScore:
    name: str
    psnr: float
    ssim: float
    seconds: float
    images: List[Dict[str, float]] = field(default_factory=list)


def load_references(key: Optional[str]) -> Dict[str, Dict]:
    """Published/reference numbers for ``key`` (see references.yml); empty when none."""
    if not key:
        return {}
    table = yaml.safe_load(_REFERENCES.read_text())
    return table.get(key, {})


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in 0..1 -> HxWx3 uint8, clamped and rounded like every SR test script."""
    return (t[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


def score_dataset(model: nn.Module, data: PairedImageFolder, scale: int, val: ValOptions, device: torch.device,
                  save_dir: Optional[Path] = None) -> DatasetScore:
    crop = scale if val.crop_border is None else val.crop_border
    images = []
    start = time.perf_counter()
    for pair in tqdm(data, total=len(data), desc=f"{data.name} x{scale}", leave=False):
        lq = torch.from_numpy(pair.lq).permute(2, 0, 1)[None].contiguous().float().div(255.0).to(device)
        sr = to_uint8(super_resolve(model, lq, scale, val.window_pad, val.tile, val.tile_overlap))
        if sr.shape != pair.gt.shape:
            raise RuntimeError(f"{data.name}/{pair.name}: SR output {sr.shape} != HR {pair.gt.shape}")
        images.append({"name": pair.name,
                       "psnr": metrics.psnr(sr, pair.gt, crop, val.test_y_channel),
                       "ssim": metrics.ssim(sr, pair.gt, crop, val.test_y_channel)})
        if save_dir is not None:
            suffix = f"_{val.suffix}" if val.suffix else ""
            write_image(save_dir / data.name / f"{pair.name}{suffix}.png", sr)
    return DatasetScore(data.name, float(np.mean([r["psnr"] for r in images])),
                        float(np.mean([r["ssim"] for r in images])), time.perf_counter() - start, images)


def zero_outputs(model: nn.Module, names: List[str], where: str) -> nn.Module:
    """Make the named modules output zeros shaped like their input, without running them: a test-time ablation of
    residual branches (e.g. the long skip's body). Each must keep its input's shape, as such a branch does; that is
    checked by running it once, on the first call."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{where}: {name!r} is not a module of {type(model).__name__}") from None
        module.forward = _zeros_like_input(module.forward, f"{where}: {name!r}")
    return model


def _zeros_like_input(forward, label: str):
    checked: List[bool] = []

    def zeros(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not checked:
            out = forward(x, *args, **kwargs)
            if out.shape != x.shape:
                raise ConfigError(f"{label} maps {tuple(x.shape)} to {tuple(out.shape)}: only a branch that keeps "
                                  f"its input's shape can be zeroed")
            checked.append(True)
        return torch.zeros_like(x)

    return zeros


def build_model(opts: TestOptions, source: str, device: torch.device) -> nn.Module:
    """The FP network with its weights, or the quantized one when the checkpoint holds quantizer bounds; the
    outputs of ``opts.zero_outputs`` zeroed."""
    if opts.zero_outputs and opts.network_g.get("type") == "onnx":
        raise ConfigError(f"{source} zero_outputs: not supported for an onnx network")
    return zero_outputs(_load_model(opts, source, device), opts.zero_outputs, f"{source} zero_outputs")


def _load_model(opts: TestOptions, source: str, device: torch.device) -> nn.Module:
    if opts.network_g.get("type") == "onnx":  # an exported integer model (scripts/export.py --format onnx)
        from condiquant.deploy.onnx_runtime import OnnxSR

        if "path" not in opts.network_g:
            raise ConfigError(f"{source} network_g.path: an onnx network needs the .onnx file")
        model = OnnxSR(opts.network_g["path"], opts.num_threads)
        if model.scale != opts.scale:
            raise ConfigError(f"{source} scale: {opts.scale}, but {opts.network_g['path']} is x{model.scale}")
        return model
    path = opts.path.pretrain_network_g
    if path and Path(path).suffix == ".cqpack" and Path(path).is_file():  # scripts/export.py --format packed
        return freeze_weights(load_packed(Path(path), opts.network_g, f"{source} network_g").eval().to(device))
    if path and Path(path).is_file() and quant_options_of(Path(path)) is not None:
        return freeze_weights(build_quantized(Path(path), opts.network_g, source).eval().to(device))
    model = build_network(opts.network_g, f"{source} network_g")
    if path:
        load_pretrained(model, path, opts.path.param_key_g, opts.path.strict_load_g)
    return model.eval().to(device)


def format_table(scores: List[DatasetScore], references: Dict[str, Dict]) -> str:
    """Markdown table: ours, then the reference in its own clearly labelled columns."""
    lines = ["| dataset | ours PSNR | ours SSIM | reference PSNR | reference SSIM | reference source |",
             "|---|---|---|---|---|---|"]
    for s in scores:
        ref = references.get(s.name, {})
        rp = f"{ref['psnr']:.3f}" if "psnr" in ref else "–"
        rs = f"{ref['ssim']:.4f}" if "ssim" in ref else "–"
        lines.append(f"| {s.name} | {s.psnr:.3f} | {s.ssim:.4f} | {rp} | {rs} | {ref.get('source', '–')} |")
    return "\n".join(lines)


def run_test(opts: TestOptions, source: str, command: str = "") -> List[DatasetScore]:
    """The whole ``test.py`` job; ``source`` names the options file in messages."""
    device = configure(opts.device, opts.num_threads)
    # Build everything that can fail on bad input before anything is written.
    model = build_model(opts, source, device)
    datasets = [PairedImageFolder(d, opts.scale, f"{source} datasets.{key}") for key, d in opts.datasets.items()]
    for data in datasets:
        data.check()
    out_dir = Path("results") / opts.name
    logger = open_run_dir(out_dir, "test", opts.name, opts, command)
    references = load_references(opts.reference)
    scores = []
    for data in datasets:
        save_dir = out_dir / "visualization" if opts.val.save_img else None
        score = score_dataset(model, data, opts.scale, opts.val, device, save_dir)
        logger.info("%s: PSNR %.4f dB, SSIM %.4f (%d images, %.1f s)", score.name, score.psnr, score.ssim,
                    len(score.images), score.seconds)
        scores.append(score)
    table = format_table(scores, references)
    header = (f"# {opts.name}\n\nProduced by `{command or 'python test.py -opt ' + source}`.\n"
              f"PSNR/SSIM on Y (BT.601, +16), crop border {opts.val.crop_border or opts.scale}, "
              f"window padding `{opts.val.window_pad}`. Reference columns are not ours.\n\n")
    (out_dir / "metrics.md").write_text(header + table + "\n")
    (out_dir / "metrics.json").write_text(json.dumps({
        "name": opts.name, "command": command, "options": to_dict(opts),
        "datasets": {s.name: {"psnr": s.psnr, "ssim": s.ssim, "seconds": s.seconds, "images": s.images}
                     for s in scores},
        "reference": references}, indent=2))
    logger.info("results in %s\n%s", out_dir, table)
    return scores
