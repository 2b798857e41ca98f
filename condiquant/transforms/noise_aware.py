"""Activation-noise-aware weight correction: fit each layer's weights to its *quantized* input.

CondiQuant lowers kappa(W), a proxy for how much activation-quantization noise a layer amplifies. This pass
minimises the quantity itself. For a layer with FP input X (rows = calibration positions; a convolution's input
unfolded, after any ``transform_input`` pre-transform), its input after the layer's activation quantizer Xq = X + E,
and original weights W0 (out x in), the weights that best keep the FP output when fed the quantized input are

    W* = argmin_W ||Xq W^T - X W0^T||_F^2 + rho ||W - W0||_F^2 = W0 (X^T Xq + rho I) (Xq^T Xq + rho I)^-1,

from two Gram matrices (float64), with rho = ridge * trace(Xq^T Xq) / d (the ridge is relative to the mean
eigenvalue, so unitless). The ridge pulls towards W0 (ridge -> inf leaves the layer unchanged, so no ridge makes
the in-sample error worse than W0's); ``anchor: zero`` is the plain ridge W0 (X^T Xq) (Xq^T Xq + rho I)^-1,
which shrinks W towards 0 and can end worse than W0. At ridge 0 both are the least-squares fit. Nothing is added
to the network; biases are untouched.

- parallel (default): X and Xq from the FP network (Xq = the layer's quantizer applied to its FP input), one
  pass over the crops in chunks;
- sequential: X from the FP network, Xq from the quantized network in which every earlier layer is already
  corrected and has refitted weight bounds, so the correction also absorbs the error arriving from upstream.
  Every layer must see all crops before the next one is corrected, so the crops go through as one batch.

Activation bounds must be initialised before (E depends on them); the corrected layer's weight bounds are
refitted right after its correction (``refit``). Reported per layer: the relative output error
||Xq W^T - X W0^T||_F / ||X W0^T||_F with W = W0 (before) and W = W* (after), on the calibration crops
(in-sample) and on held-out crops of the calibration validation images (out-of-sample); weight quantization is
not part of it. A split Linear (q, k, v with their own input quantizers) is corrected chunk by chunk.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from condiquant.options import ConditioningOptions, NoiseAwareOptions
from condiquant.quant.modules import QuantModule
from condiquant.transforms.conditioning import (forward_with_input_hooks, input_columns, jsonable, kappa,
                                                layer_input)

# ---------------------------------------------------------------------------------------------------------------
# Pure float64 solver


@dataclass
class CrossGram:
    """Sums over the rows x (FP) and xq (quantized) of one layer's input: x x^T, x xq^T, xq xq^T."""

    xx: Tensor
    xq: Tensor
    qq: Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, d: int, device: torch.device) -> "CrossGram":
        return cls(*(torch.zeros(d, d, dtype=torch.float64, device=device) for _ in range(3)))

    def add(self, x: Tensor, q: Tensor) -> None:
        """Accumulate column blocks x, q (d, rows), float64."""
        self.xx.addmm_(x, x.T)
        self.xq.addmm_(x, q.T)
        self.qq.addmm_(q, q.T)
        self.rows += x.shape[1]


def noise_aware_weight(w0: Tensor, gram: CrossGram, ridge: float, anchor: str = "w0") -> Tensor:
    """argmin_W ||Xq W^T - X W0^T||^2 + rho ||W - A||^2 with A = W0 (anchor 'w0') or 0 ('zero'):
    (W0 X^T Xq + rho A) (Xq^T Xq + rho I)^-1, rho = ridge * trace(Xq^T Xq) / d; float64 in and out."""
    d = gram.qq.shape[0]
    rho = ridge * float(torch.diagonal(gram.qq).sum()) / d
    eye = torch.eye(d, dtype=gram.qq.dtype, device=gram.qq.device)
    rhs = gram.xq.T + rho * eye if anchor == "w0" else gram.xq.T
    # (Xq^T Xq + rho I) W^T = (Xq^T X + rho [I]) W0^T; least squares also covers ridge 0 with a singular Gram.
    return torch.linalg.lstsq(gram.qq + rho * eye, rhs @ w0.T).solution.T


def output_error(w: Tensor, w0: Tensor, gram: CrossGram) -> float:
    """||Xq W^T - X W0^T||_F / ||X W0^T||_F from the Grams, without X."""
    ref = float(((w0 @ gram.xx) * w0).sum())
    num = float(((w @ gram.qq) * w).sum()) - 2 * float(((w @ gram.xq.T) * w0).sum()) + ref
    if ref <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num, 0.0) / ref)


# ---------------------------------------------------------------------------------------------------------------
# Layer statistics


def _accumulate(stats: Dict[str, CrossGram], key: str, fp_module: nn.Module, x: Tensor, xq: Tensor) -> None:
    """Add the rows of transformed inputs x (FP) and xq (quantized) of ``fp_module`` to ``stats[key]``."""
    for cx, cq in zip(input_columns(fp_module, x), input_columns(fp_module, xq)):
        if key not in stats:
            stats[key] = CrossGram.zeros(cx.shape[0], cx.device)
        stats[key].add(cx, cq)


def _key(name: str, chunk: int, splits: int) -> str:
    return name if splits == 1 else f"{name}[{chunk}]"


def collect_cross_grams(fp_model: nn.Module, q_model: nn.Module, layers: Mapping[str, int],
                        batches: Iterable[Tensor], input_range: float) -> Dict[str, CrossGram]:
    """Parallel mode: per layer (and output chunk) the Grams of the FP input and of the same input passed through
    the quantized layer's activation quantizer(s), by forward hooks on the FP network."""
    stats: Dict[str, CrossGram] = {}

    def hook(name: str, module: nn.Module, x: Tensor) -> None:
        x = layer_input(module, x)
        for i, q in enumerate(q_model.get_submodule(name).input_quantizers):
            _accumulate(stats, _key(name, i, layers[name]), module, x, q(x))

    forward_with_input_hooks(fp_model, [(fp_model.get_submodule(n), partial(hook, n)) for n in layers], batches,
                             input_range)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Model pass


@dataclass
class LayerCorrection:
    name: str  # module name; "name[i]" for output chunk i of a split layer
    shape: Tuple[int, int]  # out x in (convolutions: out x in*k*k)
    kappa_before: float
    kappa_after: float
    error_calib_before: float  # relative output error with W0, calibration crops
    error_calib_after: float  # with W*
    error_holdout_before: float  # the same on held-out crops
    error_holdout_after: float
    calib_rows: int  # positions in X (calibration crops)
    seconds: float


@dataclass
class NoiseAwareReport:
    ridge: float
    anchor: str
    sequential: bool
    layers: List[LayerCorrection] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason
    seconds: float = 0.0

    def summed(self, key: str) -> float:
        return float(sum(getattr(r, key) for r in self.layers))


def _correct(q_module: nn.Module, name: str, splits: int, calib: Mapping[str, CrossGram],
             holdout: Mapping[str, CrossGram], opts: NoiseAwareOptions) -> List[LayerCorrection]:
    """Replace the weight of ``q_module`` (chunk by chunk) by its noise-aware solution, in place."""
    weight = q_module.weight
    chunk = weight.shape[0] // splits
    out = []
    for i in range(splits):
        tic = time.perf_counter()
        key = _key(name, i, splits)
        target = weight.data[i * chunk:(i + 1) * chunk]
        w0 = target.reshape(chunk, -1).double()
        target.copy_(noise_aware_weight(w0, calib[key], opts.ridge, opts.anchor).reshape(target.shape))
        w = target.reshape(chunk, -1).double()  # as cast back
        out.append(LayerCorrection(
            key, (int(w0.shape[0]), int(w0.shape[1])), kappa(torch.linalg.svdvals(w0)),
            kappa(torch.linalg.svdvals(w)), output_error(w0, w0, calib[key]), output_error(w, w0, calib[key]),
            output_error(w0, w0, holdout[key]), output_error(w, w0, holdout[key]), calib[key].rows,
            time.perf_counter() - tic))
    return out


def skipped_layers(q_model: nn.Module, fp_model: nn.Module, layers: Mapping[str, int]) -> Dict[str, str]:
    reasons = {}
    for name in layers:
        module, q = fp_model.get_submodule(name), q_model.get_submodule(name)
        if not isinstance(q, QuantModule):
            reasons[name] = "not quantized"
        elif not len(q.input_quantizers):
            reasons[name] = "no activation quantizer"
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            reasons[name] = f"grouped convolution (groups={module.groups})"
    return reasons


def correct_layers(q_model: nn.Module, layers: Mapping[str, int], calib: Mapping[str, CrossGram],
                   holdout: Mapping[str, CrossGram], opts: NoiseAwareOptions,
                   refit: Callable[[str], None]) -> List[LayerCorrection]:
    """Parallel mode from precomputed Grams (``collect_cross_grams``): correct every layer, refit its bounds."""
    reports = []
    for name, splits in layers.items():
        reports += _correct(q_model.get_submodule(name), name, splits, calib, holdout, opts)
        refit(name)
    return reports


def _correct_parallel(q_model: nn.Module, fp_model: nn.Module, layers: Mapping[str, int],
                      calib_batches: Sequence[Tensor], holdout_batches: Sequence[Tensor], input_range: float,
                      opts: NoiseAwareOptions, refit: Callable[[str], None]) -> List[LayerCorrection]:
    calib = collect_cross_grams(fp_model, q_model, layers, calib_batches, input_range)
    holdout = collect_cross_grams(fp_model, q_model, layers, holdout_batches, input_range)
    return correct_layers(q_model, layers, calib, holdout, opts, refit)


@torch.no_grad()
def _correct_sequential(q_model: nn.Module, fp_model: nn.Module, layers: Mapping[str, int],
                        calib_batches: Sequence[Tensor], holdout_batches: Sequence[Tensor], input_range: float,
                        opts: NoiseAwareOptions, refit: Callable[[str], None]) -> List[LayerCorrection]:
    batches = [*calib_batches, *holdout_batches]
    n_calib = sum(b.shape[0] for b in calib_batches)
    n_total = n_calib + sum(b.shape[0] for b in holdout_batches)
    fp_inputs: Dict[str, List[Tensor]] = {n: [] for n in layers}

    def store(name: str, module: nn.Module, x: Tensor) -> None:
        fp_inputs[name].append(layer_input(module, x))

    forward_with_input_hooks(fp_model, [(fp_model.get_submodule(n), partial(store, n)) for n in layers], batches,
                             input_range)
    reports: List[LayerCorrection] = []

    def correct(name: str, _module: nn.Module, x_in: Tensor) -> None:
        if name not in fp_inputs or len(fp_inputs[name]) != len(batches):
            raise ValueError(f"sequential noise-aware correction: {name} is called more than once per forward")
        fp_module = fp_model.get_submodule(name)
        x = torch.cat(fp_inputs.pop(name))
        xin = layer_input(fp_module, x_in)
        if x.shape != xin.shape or x.shape[0] % n_total:
            raise ValueError(f"sequential noise-aware correction: input of {name} is not sample-major "
                             f"({tuple(x.shape)} FP, {tuple(xin.shape)} quantized, {n_total} samples)")
        split = x.shape[0] // n_total * n_calib  # leading dim = samples (or samples x windows, sample-major)
        calib: Dict[str, CrossGram] = {}
        holdout: Dict[str, CrossGram] = {}
        q_module = q_model.get_submodule(name)
        for i, q in enumerate(q_module.input_quantizers):
            key = _key(name, i, layers[name])
            xq = q(xin)
            _accumulate(calib, key, fp_module, x[:split], xq[:split])
            _accumulate(holdout, key, fp_module, x[split:], xq[split:])
        reports.extend(_correct(q_module, name, layers[name], calib, holdout, opts))
        refit(name)

    # One batch: every layer must see all crops before the layers after it are corrected.
    forward_with_input_hooks(q_model, [(q_model.get_submodule(n), partial(correct, n)) for n in layers],
                             [torch.cat(batches)], input_range)
    if fp_inputs:  # a corrected layer's inputs are popped
        raise ValueError(f"modules never called in the quantized forward: {', '.join(fp_inputs)}")
    return reports


def correct_model(q_model: nn.Module, fp_model: nn.Module, layers: Mapping[str, int], opts: ConditioningOptions,
                  calib_batches: Sequence[Tensor], holdout_batches: Sequence[Tensor], input_range: float,
                  refit: Callable[[str], None], logger: logging.Logger,
                  diagnostics_dir: Optional[Path] = None) -> NoiseAwareReport:
    """Correct ``layers`` (name -> output chunks) of the quantized ``q_model`` in place; its activation bounds
    must be initialised. ``refit(name)`` refits a corrected module's weight bounds."""
    n = opts.noise_aware
    tic = time.perf_counter()
    skipped = skipped_layers(q_model, fp_model, layers)
    todo = {k: s for k, s in layers.items() if k not in skipped}
    solve = _correct_sequential if n.sequential else _correct_parallel
    report = NoiseAwareReport(n.ridge, n.anchor, n.sequential, solve(q_model, fp_model, todo, calib_batches,
                                                                       holdout_batches, input_range, n, refit),
                              skipped)
    report.seconds = time.perf_counter() - tic
    for name, reason in skipped.items():
        logger.info("noise-aware correction: skipped %s: %s", name, reason)
    if report.layers:
        logger.info("noise-aware correction (%s, ridge %g towards %s) of %d weight matrices in %.1f s: summed "
                    "relative layer error in-sample %.4g -> %.4g, held-out %.4g -> %.4g; median kappa %.4g -> %.4g",
                    "sequential" if n.sequential else "parallel", n.ridge, n.anchor, len(report.layers),
                    report.seconds, report.summed("error_calib_before"), report.summed("error_calib_after"),
                    report.summed("error_holdout_before"), report.summed("error_holdout_after"),
                    np.median([r.kappa_before for r in report.layers]),
                    np.median([r.kappa_after for r in report.layers]))
    if diagnostics_dir is not None:
        write_diagnostics(report, diagnostics_dir)
    return report


def write_diagnostics(report: NoiseAwareReport, out_dir: Path) -> None:
    """``noise_aware.json`` (per layer: errors before/after in- and out-of-sample, kappa) and
    ``noise_aware.png`` (held-out error and kappa per layer, before/after)."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "noise_aware.json").write_text(json.dumps(jsonable(asdict(report)), indent=1, allow_nan=False))
    fig = Figure(figsize=(max(6.0, 0.07 * len(report.layers)), 6.0))
    idx = np.arange(len(report.layers))
    for row, (label, keys) in enumerate((("held-out relative output error", ("error_holdout_before",
                                                                             "error_holdout_after")),
                                         ("condition number", ("kappa_before", "kappa_after")))):
        ax = fig.add_subplot(2, 1, row + 1)
        for key, style in zip(keys, ("o", "s")):
            ax.plot(idx, [getattr(r, key) for r in report.layers], style, ms=3,
                    label="before" if key.endswith("before") else "after")
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax.set_xlabel("layer index (order of noise_aware.json)")
    fig.suptitle(f"noise-aware correction ({'sequential' if report.sequential else 'parallel'}, "
                 f"ridge {report.ridge:g} towards {report.anchor})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "noise_aware.png", dpi=120)
