"""CondiQuant's weight conditioning, reconstructed (the paper's code is unreleased; see docs/papers.md §1.3).

For each selected layer, with W0 its weight as a matrix (out x in; a convolution's as out x in*k*k) and X its FP
input on calibration crops (rows = positions; a convolution's input unfolded, after any ``transform_input``
pre-transform, so X holds exactly what the weight multiplies):

    min_W  f(W) + lam * G(W),    f(W) = ||X W^T - X W0^T||_F^2 / (2 L),    L = lambda_max(X^T X),

by K proximal-gradient iterations: a gradient step on f (gradient (W - W0) X^T X / L, 1-Lipschitz, so the step is
1: the step 1/L of the undivided data term), then the closed-form prox of lam * G through an SVD of W. Dividing f
by L puts both terms in units of ||W||^2, so ``lam`` is dimensionless and means the same for every layer,
calibration-set size and activation scale (the undivided objective's lambda is lam * L). On EMT and IMDN x4,
lam = 1e-3 moves every held-out layer output by less than 5% (100 iterations; see conditioning.json).

- ``shrink``: G = 1/2 sum_i (s_i - mean s)^2; the prox keeps U, V and the mean singular value and divides every
  deviation from the mean by 1 + lam.
- ``kappa_bound``: G = indicator(kappa(W) <= kappa_max); the prox is the Frobenius projection onto that set: the
  singular values clipped into [a, kappa_max * a] with the best a (a = s_max / kappa_max is feasible but in general
  not the nearest point).

X is nearly rank-deficient, so W can move in directions X does not see: kappa falls while X W^T barely changes.
Only X^T X is needed, accumulated in float64 by forward hooks on the FP model; layers are conditioned
independently, each on the FP network's inputs. The solve runs in float64 and the result is cast back; biases are
untouched and nothing is added to the network. Each layer's relative output change is then measured on held-out
crops (from the calibration validation images) and checked against ``tolerance``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from condiquant.config import ConfigError
from condiquant.options import ConditioningOptions, QuantOptions
from condiquant.quant.attach import select_modules
from condiquant.quant.modules import input_transform
from condiquant.quant.patterns import matches

_BLOCK_ELEMS = 1 << 22  # values of X per float64 Gram update (32 MB)


# ---------------------------------------------------------------------------------------------------------------
# Pure float64 solver


def kappa(s: Tensor) -> float:
    """Condition number from singular values; inf for a singular matrix."""
    low = float(s.min())
    return float(s.max()) / low if low > 0 else math.inf


def _shrink_values(s: Tensor, t: float) -> Tensor:
    mean = s.mean()
    return mean + (s - mean) / (1.0 + t)


def _project_kappa_values(s: Tensor, kappa_max: float) -> Tensor:
    """Euclidean projection of singular values onto {max <= kappa_max * min}.

    The nearest feasible point is clip(s, a, kappa_max * a) for the a minimising phi(a) = sum_i dist(s_i,
    [a, kappa_max a])^2, a convex piecewise quadratic. Its minimiser is a breakpoint (s_i or s_i / kappa_max) or
    the stationary point of one piece, so all of these are evaluated.
    """
    k = kappa_max
    if s.max() <= k * s.min():
        return s.clone()
    edges = torch.cat([s, s / k]).unique()  # sorted breakpoints
    mid = ((edges[:-1] + edges[1:]) / 2)[:, None]
    low, high = s < mid, s > k * mid  # (pieces, n): which terms are active on each piece
    # Infeasible s: on every piece some term is active, so the denominator is positive.
    num = (s * low).sum(1) + k * (s * high).sum(1)
    den = low.sum(1) + k * k * high.sum(1)
    stationary = torch.minimum(torch.maximum(num / den, edges[:-1]), edges[1:])
    cand = torch.cat([edges, stationary])[:, None]
    cost = ((cand - s).clamp(min=0) ** 2 + (s - k * cand).clamp(min=0) ** 2).sum(1)
    a = cand[cost.argmin(), 0]
    return torch.minimum(torch.maximum(s, a), k * a)


def _prox_svd(w: Tensor, values: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor]:
    """(U diag(values(s)) V^T, values(s)) for W = U diag(s) V^T."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    new = values(s)
    return (u * new) @ vh, new


def prox_shrink(w: Tensor, t: float) -> Tensor:
    """argmin_Z 1/2 ||Z - W||_F^2 + t/2 sum_i (s_i(Z) - mean s(Z))^2.

    Exact: the penalty depends on the singular values only, so (von Neumann's trace inequality) Z keeps W's singular
    vectors, and on the values the problem splits into the mean (kept) and the deviations (divided by 1 + t).
    """
    return _prox_svd(w, partial(_shrink_values, t=t))[0]


def prox_kappa(w: Tensor, kappa_max: float) -> Tensor:
    """Frobenius projection of W onto {Z : kappa(Z) <= kappa_max} (exact, for the same reason as prox_shrink)."""
    return _prox_svd(w, partial(_project_kappa_values, kappa_max=kappa_max))[0]


def _penalty(regularizer: str, lam: float, kappa_max: float) -> Callable[[Tensor], float]:
    """lam * G as a function of the singular values."""
    if regularizer == "shrink":
        return lambda s: lam * 0.5 * float(((s - s.mean()) ** 2).sum())
    # Indicator; the relative slack absorbs the rounding of the projection's max / min = kappa_max.
    return lambda s: 0.0 if s.max() <= kappa_max * (1 + 1e-9) * s.min() else math.inf


def condition_weight(w0: Tensor, gram: Tensor, regularizer: str, lam: float, kappa_max: float,
                     iters: int) -> Tuple[Tensor, Dict[str, Any]]:
    """K proximal-gradient iterations from W0 for min_W ||X (W - W0)^T||^2 / (2L) + lam G(W), gram = X^T X.

    ``w0`` (out, in) and ``gram`` (in, in) are float64; returns W (float64) and info: kappa and Frobenius norm
    before/after, ``lipschitz`` L, and for the iterates W0 = W_0 .. W_K the data term 1/2 ||X (W_k - W0)^T||_F^2
    (``data``) and the objective f + lam G (``objective``, in units of ||W||^2).
    """
    if regularizer == "shrink":
        values = partial(_shrink_values, t=lam)
    elif regularizer == "kappa_bound":
        values = partial(_project_kappa_values, kappa_max=kappa_max)
    else:
        raise ValueError(f"unknown regularizer {regularizer!r}")
    penalty = _penalty(regularizer, lam, kappa_max)
    # Iterate in the Gram's eigenbasis (W -> W Q): the gradient step becomes a column scaling, and the prox is
    # unchanged because singular values and the SVD-based maps are invariant under right rotations.
    eig, q = torch.linalg.eigh(gram)
    lipschitz = float(eig[-1])
    if not lipschitz > 0:
        raise ValueError("the layer's input is zero on the calibration data")
    mu = (eig / lipschitz).clamp(min=0)  # rounding can leave tiny negative eigenvalues
    start = w0 @ q
    w, s = start, torch.linalg.svdvals(w0)
    data: List[float] = []
    objective: List[float] = []
    for k in range(iters + 1):
        diff = w - start
        grad = diff * mu
        f = 0.5 * float((grad * diff).sum())  # = ||X (W - W0)^T||^2 / (2L)
        data.append(lipschitz * f)
        objective.append(f + penalty(s))
        if k < iters:
            w, s = _prox_svd(w - grad, values)
    w = w @ q.T
    info = {"kappa_before": kappa(torch.linalg.svdvals(w0)), "kappa_after": kappa(torch.linalg.svdvals(w)),
            "norm_before": float(w0.norm()), "norm_after": float(w.norm()), "lipschitz": lipschitz,
            "data": data, "objective": objective}
    return w, info


def relative_change(w: Tensor, w0: Tensor, gram: Tensor) -> float:
    """||X (W - W0)^T||_F / ||X W0^T||_F from gram = X^T X, without X."""
    d = w - w0
    num = max(float(((d @ gram) * d).sum()), 0.0)
    den = float(((w0 @ gram) * w0).sum())
    if den <= 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


# ---------------------------------------------------------------------------------------------------------------
# Layer inputs


@dataclass
class Gram:
    xtx: Tensor  # (d, d) float64: sum over the rows x of X of x x^T
    rows: int


def layer_input(module: nn.Module, x: Tensor) -> Tensor:
    """What the weight of an FP Linear/Conv2d multiplies: its input, after a ``transform_input`` pre-transform."""
    fn = input_transform(module)
    return fn(module, x) if fn is not None else x


def input_columns(module: nn.Module, x: Tensor) -> Iterator[Tensor]:
    """X^T in float64 blocks (d, rows) of about _BLOCK_ELEMS values from ``x = layer_input(module, input)``: a
    Linear's input rows, or a convolution's unfolded patches, whole samples at a time. Large blocks keep the Gram
    updates few and large (fast), the bound keeps the float64 copy small."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        for block in rows.split(max(1, _BLOCK_ELEMS // rows.shape[1])):
            yield block.T.double()
        return
    kh, kw = module.kernel_size
    d = x.shape[1] * kh * kw
    for block in x.split(max(1, _BLOCK_ELEMS // (d * x.shape[2] * x.shape[3]))):
        cols = F.unfold(block, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, d, P)
        yield cols.transpose(0, 1).reshape(d, -1).double()


InputHook = Callable[[nn.Module, Tensor], None]


@torch.no_grad()
def forward_with_input_hooks(model: nn.Module, hooks: Iterable[Tuple[nn.Module, InputHook]],
                             batches: Iterable[Tensor], input_range: float) -> None:
    """Run ``model`` on every batch (LR crops in 0..1) with ``hook(module, input)`` called before each hooked
    module's forward (so a hook may still change the module), then remove the hooks."""
    handles = [m.register_forward_pre_hook(lambda mod, inputs, fn=fn: fn(mod, inputs[0])) for m, fn in hooks]
    try:
        for batch in batches:
            model(batch * input_range)
    finally:
        for h in handles:
            h.remove()


def collect_grams(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Tensor],
                  input_range: float) -> Dict[str, Gram]:
    """X^T X (float64) of every module's input over ``batches`` (LR crops in 0..1), by forward hooks."""
    grams: Dict[str, Gram] = {}

    def hook(name: str, module: nn.Module, x: Tensor) -> None:
        for cols in input_columns(module, layer_input(module, x)):
            if name not in grams:
                grams[name] = Gram(cols.new_zeros(cols.shape[0], cols.shape[0]), 0)
            grams[name].xtx.addmm_(cols, cols.T)
            grams[name].rows += cols.shape[1]

    forward_with_input_hooks(model, [(m, partial(hook, name)) for name, m in modules.items()], batches, input_range)
    unused = [name for name in modules if name not in grams]
    if unused:
        raise ValueError(f"modules never called in the forward pass: {', '.join(unused)}")
    return grams


# ---------------------------------------------------------------------------------------------------------------
# Model pass


def conditioning_layers(model: nn.Module, quant: QuantOptions, opts: ConditioningOptions) -> Dict[str, int]:
    """Modules the placement will quantize, of a type in ``opts.targets``, named by ``opts.layers``; values are
    the output chunks with their own weight quantizers (each chunk is conditioned on its own)."""
    return {sel.name: sel.splits for sel in select_modules(model, quant)
            if sel.kind in opts.targets and matches(sel.name, opts.layers)}


@dataclass
class LayerReport:
    name: str  # module name; "name[i]" for output chunk i of a split layer
    shape: Tuple[int, int]  # the conditioned matrix: out x in (convolutions: out x in*k*k)
    kappa_before: float
    kappa_after: float  # of the weight as cast back
    norm_before: float
    norm_after: float
    change_calib: float  # ||X (W - W0)^T||_F / ||X W0^T||_F on the calibration crops
    change_holdout: float  # the same on the held-out crops
    seconds: float


@dataclass
class ConditioningReport:
    options: ConditioningOptions
    layers: List[LayerReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # name -> reason
    calib_rows: int = 0  # rows of X of one conditioned layer (positions seen)
    gram_seconds: float = 0.0
    solve_seconds: float = 0.0

    def violations(self) -> List[LayerReport]:
        """Layers whose held-out output changes by more than the tolerance, worst first."""
        bad = [r for r in self.layers if not r.change_holdout <= self.options.tolerance]
        return sorted(bad, key=lambda r: -r.change_holdout)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small SVDs gain nothing from threads, and on busy cores OpenMP barriers made them up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@_one_thread()
def condition_layers(model: nn.Module, layers: Mapping[str, int], grams: Mapping[str, Gram],
                     holdout: Mapping[str, Gram], opts: ConditioningOptions) -> List[LayerReport]:
    """Condition the weights of ``layers`` (name -> output chunks) in place from precomputed Grams."""
    reports = []
    for name, splits in layers.items():
        weight = model.get_submodule(name).weight
        chunk = weight.shape[0] // splits
        for i in range(splits):
            tic = time.perf_counter()
            target = weight.data[i * chunk:(i + 1) * chunk]
            w0 = target.reshape(chunk, -1).double()
            w, info = condition_weight(w0, grams[name].xtx, opts.regularizer, opts.lam, opts.kappa_max, opts.iters)
            target.copy_(w.reshape(target.shape))
            used = target.reshape(chunk, -1).double()  # what the network computes with, after the cast
            reports.append(LayerReport(
                name if splits == 1 else f"{name}[{i}]", (int(w0.shape[0]), int(w0.shape[1])),
                info["kappa_before"], kappa(torch.linalg.svdvals(used)), info["norm_before"], float(used.norm()),
                relative_change(used, w0, grams[name].xtx), relative_change(used, w0, holdout[name].xtx),
                time.perf_counter() - tic))
    return reports


def check_equivalence(report: ConditioningReport, logger: logging.Logger) -> None:
    """Act on layers whose held-out output moved more than ``tolerance`` (warn, or raise ConfigError)."""
    bad = report.violations()
    if not bad:
        return
    tol = report.options.tolerance
    if report.options.on_violation == "error":
        raise ConfigError(f"conditioning.tolerance: layer {bad[0].name} changes its held-out output by "
                          f"{bad[0].change_holdout:.4g} > {tol:g} ({len(bad)} layers over; lower conditioning.lam, "
                          f"raise kappa_max or set on_violation: warn)")
    logger.warning("conditioning changes the held-out output of %d layers by more than %g: %s", len(bad), tol,
                   ", ".join(f"{r.name} ({r.change_holdout:.3g})" for r in bad))


@dataclass
class LayerInputs:
    """What the solver needs of the data: calibration and held-out Grams of the layers that can be conditioned."""

    grams: Dict[str, Gram]
    holdout: Dict[str, Gram]
    skipped: Dict[str, str]  # name -> reason
    seconds: float


def gather_inputs(model: nn.Module, layers: Iterable[str], calib_batches: Iterable[Tensor],
                  holdout_batches: Iterable[Tensor], input_range: float) -> LayerInputs:
    """Grams of the FP inputs of ``layers`` (one pass over each batch set); grouped convolutions and layers whose
    input is zero on the calibration crops are skipped."""
    skipped = {}
    for name in layers:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            skipped[name] = f"grouped convolution (groups={module.groups})"
    modules = {n: model.get_submodule(n) for n in layers if n not in skipped}
    tic = time.perf_counter()
    grams = collect_grams(model, modules, calib_batches, input_range)
    holdout = collect_grams(model, modules, holdout_batches, input_range)
    seconds = time.perf_counter() - tic
    for name, gram in grams.items():
        if not gram.xtx.any():
            skipped[name] = "zero input on the calibration crops"
    return LayerInputs({n: g for n, g in grams.items() if n not in skipped},
                       {n: g for n, g in holdout.items() if n not in skipped}, skipped, seconds)


def condition_model(model: nn.Module, opts: ConditioningOptions, calib_batches: Iterable[Tensor],
                    holdout_batches: Iterable[Tensor], layers: Mapping[str, int], input_range: float,
                    logger: logging.Logger, diagnostics_dir: Optional[Path] = None,
                    source: Optional[nn.Module] = None) -> ConditioningReport:
    """Condition ``layers`` (name -> output chunks) of ``model`` in place, then check output equivalence on the
    held-out batches; diagnostics are written (if asked) before the check can raise. X comes from ``source`` (an
    FP network with the same layer names; default ``model`` itself), so ``model`` may already be quantized."""
    inputs = gather_inputs(source if source is not None else model, layers, calib_batches, holdout_batches,
                           input_range)
    todo = {n: s for n, s in layers.items() if n in inputs.grams}
    tic = time.perf_counter()
    report = ConditioningReport(opts, condition_layers(model, todo, inputs.grams, inputs.holdout, opts),
                                inputs.skipped, next((g.rows for g in inputs.grams.values()), 0), inputs.seconds,
                                time.perf_counter() - tic)
    for name, reason in report.skipped.items():
        logger.info("conditioning: skipped %s: %s", name, reason)
    if report.layers:
        worst = max(report.layers, key=lambda r: r.change_holdout)
        logger.info("conditioned %d weight matrices (%s, lam %g, kappa_max %g, %d iterations): median kappa "
                    "%.4g -> %.4g; largest held-out output change %.3g (%s); Grams %.1f s, iterations %.1f s",
                    len(report.layers), opts.regularizer, opts.lam, opts.kappa_max, opts.iters,
                    np.median([r.kappa_before for r in report.layers]),
                    np.median([r.kappa_after for r in report.layers]), worst.change_holdout, worst.name,
                    report.gram_seconds, report.solve_seconds)
    if diagnostics_dir is not None:
        write_diagnostics(report, diagnostics_dir)
    check_equivalence(report, logger)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Diagnostics


def jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats (kappa of a singular matrix) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_diagnostics(report: ConditioningReport, out_dir: Path) -> None:
    """``conditioning.json`` (per layer: kappa, norms, output changes, seconds) and ``conditioning_kappa.png``."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "conditioning.json").write_text(json.dumps(jsonable(asdict(report)), indent=1, allow_nan=False))
    fig = Figure(figsize=(max(6.0, 0.07 * len(report.layers)), 3.6))
    ax = fig.add_subplot()
    idx = np.arange(len(report.layers))
    for key, style in (("kappa_before", "o"), ("kappa_after", "s")):
        ax.plot(idx, [getattr(r, key) for r in report.layers], style, ms=3, label=key.replace("_", " "))
    if report.options.regularizer == "kappa_bound":
        ax.axhline(report.options.kappa_max, ls="--", lw=0.8, c="gray", label="kappa_max")
    ax.set_yscale("log")
    o = report.options
    ax.set_title(f"{o.regularizer}: lam {o.lam:g}, kappa_max {o.kappa_max:g}, K {o.iters}", fontsize=9)
    ax.set_xlabel("layer index (order of conditioning.json; singular matrices not drawn)")
    ax.set_ylabel("condition number")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "conditioning_kappa.png", dpi=120)
