"""Reconstruction with learned rounding: AdaRound (layer-wise), BRECQ (block-wise), QDrop (block-wise, dropping).

From the papers (facts only): AdaRound (Nagel et al., ICML 2020) learns for every weight whether it rounds up
or down, by minimising a layer's output error plus an annealed regulariser that drives a rectified sigmoid to 0
or 1 (``quant/adaround.py``). BRECQ (Li et al., ICLR 2021) reconstructs block by block, each block's inputs coming
from the network whose earlier blocks are already quantized, with the activation step sizes learned beside the
rounding. QDrop (Wei et al., ICLR 2022) drops activation quantization at random during reconstruction (each
element keeps its FP value with probability p = 0.5).

Adapted to SR: the units are the blocks of ``recon.blocks`` (default: the placement's ``feature_modules`` -
IMDN's IMDBs, EMT's body blocks, SwinIR's residual groups, EDSR's residual blocks), then every quantized layer
outside them on its own (IMDN's fusion and LR convs), in the order the network runs them. The output error is
the MSE relative to the FP output's mean energy (SR features span 1e-3 to 1e2 across archs and input ranges,
so one rounding weight serves all); the regulariser is a mean over the unit's weights. No ground truth is used,
except by BRECQ's Fisher weighting (``recon.weighting: fisher``): each output element's squared error is weighted
by the squared gradient of the FP network's L1 loss to the HR crop with respect to it (BRECQ: the task loss's
gradient, there cross-entropy; here the loss these SR networks were trained with).

Everything runs in the one training loop (``engine/loop.py``): one parameter group per unit, the group switch
caches the unit's inputs and hardens the finished one, so a resumed run rebuilds the same cache from the saved
state and continues as if never stopped (QDrop's masks are seeded per iteration).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.config import ConfigError
from condiquant.engine.loop import Phase, train_loop
from condiquant.methods.condiquant import conditioned_quantized
from condiquant.methods.context import PTQContext
from condiquant.quant.adaround import AdaRoundQuantizer, attach_rounding, bake_rounding
from condiquant.quant.attach import named_quantizers, quant_modules, step_scales, weight_quantizer_inputs
from condiquant.quant.patterns import matches

Args = Tuple[Tuple[Any, ...], Dict[str, Any]]


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not run."""


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


def reconstruction_units(model: nn.Module, ctx: PTQContext, layerwise: bool, probe: torch.Tensor) -> List[str]:
    """Names of the units, in the order the network first runs them (one probe forward)."""
    layers = [name for name, _ in quant_modules(model)]
    if layerwise:
        candidates = layers
    else:
        patterns = ctx.opts.recon.blocks if ctx.opts.recon.blocks is not None else ctx.quant.placement.feature_modules
        blocks = [n for n, _ in model.named_modules()
                  if n and matches(n, patterns) and any(_contains(n, q) for q in layers)]
        if not blocks:
            raise ConfigError(f"recon.blocks: no module matching {patterns} holds a quantized layer")
        blocks = [b for b in blocks if not any(o != b and _contains(o, b) for o in blocks)]  # outermost only
        candidates = blocks + [q for q in layers if not any(_contains(b, q) for b in blocks)]
    order: List[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, n=n: order.append(n) if n not in order else None) for n in candidates]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in candidates if n not in order]  # never run: still reconstructed, last


def _cat(chunks: List[Args], where: str) -> Args:
    """One (args, kwargs) from per-chunk ones: tensors joined on the batch axis, anything else must agree."""
    def join(values: List[Any]) -> Any:
        if isinstance(values[0], torch.Tensor):
            return torch.cat(values, dim=0)
        if any(v != values[0] for v in values[1:]):
            raise ValueError(f"{where}: a non-tensor input differs between calibration batches")
        return values[0]
    args = tuple(join([c[0][i] for c in chunks]) for i in range(len(chunks[0][0])))
    kwargs = {k: join([c[1][k] for c in chunks]) for k in chunks[0][1]}
    return args, kwargs


def _take(a: Args, idx: torch.Tensor) -> Args:
    pick = (lambda v: v[idx] if isinstance(v, torch.Tensor) else v)
    return tuple(pick(v) for v in a[0]), {k: pick(v) for k, v in a[1].items()}


def _run_until_stop(model: nn.Module, handles: List[Any], batches: List[torch.Tensor]) -> None:
    """Run ``model`` on every batch, each forward ending where a hook raises :class:`_Stop`; remove the hooks."""
    try:
        for b in batches:
            try:
                model(b)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def unit_inputs(model: nn.Module, name: str, batches: List[torch.Tensor]) -> Args:
    """The inputs ``model`` feeds module ``name`` on ``batches`` (the forward stops there)."""
    chunks: List[Args] = []

    def hook(_m, args, kwargs):
        chunks.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                       {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    _run_until_stop(model, [model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)], batches)
    return _cat(chunks, name)


@torch.no_grad()
def unit_outputs(model: nn.Module, names: List[str], batches: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The outputs of modules ``names`` of ``model`` on ``batches``, each joined on the batch axis (each forward
    stops once all of them have run)."""
    outs: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        def hook(_m, _i, out, n=n):
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"recon: unit {n} returns {type(out).__name__}, not a tensor")
            outs[n].append(out.detach())
            if all(len(v) == len(outs[n]) for v in outs.values()):
                raise _Stop
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    _run_until_stop(model, handles, batches)
    return {n: torch.cat(v, dim=0) for n, v in outs.items()}


def unit_fisher(model: nn.Module, name: str, crops: List[torch.Tensor], hr: List[torch.Tensor]) -> torch.Tensor:
    """BRECQ's diagonal Fisher of a unit's output: the squared gradient of the task loss (L1 to the HR crop, the
    loss these SR networks were trained with) with respect to the unit's output, per element, on the FP network;
    scaled to mean 1 so the weighted loss stays a relative MSE."""
    grads: List[torch.Tensor] = []

    def hook(_m, _i, out):
        out.register_hook(lambda g: grads.append(g.detach()))

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        for x, y in zip(crops, hr):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)  # a graph even with frozen weights; grad wrt x only
                # summed, not averaged, so a crop's gradient does not depend on how the crops were chunked
                torch.autograd.grad(F.l1_loss(model(x), y, reduction="sum"), [x])
    finally:
        handle.remove()
    fisher = torch.cat(grads, dim=0).pow(2)
    return fisher / fisher.mean().clamp_min(1e-30)


class _Reconstruction:
    """The state the loop's callbacks share: units, caches, the unit being trained."""

    def __init__(self, model: nn.Module, ctx: PTQContext, units: List[str], crops: List[torch.Tensor],
                 drop_prob: float, hr: Optional[List[torch.Tensor]] = None):
        self.model, self.ctx, self.units, self.crops, self.hr = model, ctx, units, crops, hr
        self.opt = ctx.opts.recon
        self.drop_prob = drop_prob
        self.target: Optional[torch.Tensor] = None
        self.inputs: Optional[Args] = None
        self.unit: Optional[int] = None
        self.local_it = 0
        self.drop_gen = torch.Generator().manual_seed(ctx.opts.manual_seed)
        self.hooks: List[Any] = []
        weights = {n for n, _, _ in weight_quantizer_inputs(model)}
        self.rounding = [[q for _, q in named_quantizers(model.get_submodule(u)) if isinstance(q, AdaRoundQuantizer)]
                         for u in units]
        self.acts = [[q for n, q in named_quantizers(model.get_submodule(u)) if f"{u}.{n}" not in weights]
                     for u in units]

    def groups(self) -> List[List[nn.Parameter]]:
        groups = []
        for u, rq, aq in zip(self.units, self.rounding, self.acts):
            params = [q.rounding for q in rq] + [p for q in aq for p in q.parameters()]
            if not params:
                raise ConfigError(f"recon: unit {u} has no weight or activation quantizer to train")
            groups.append(params)
        return groups

    def switch(self, old: Optional[int], new: Optional[int]) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if old is not None:
            self._finish(old)
        if new is None:
            return
        self.unit = new
        name = self.units[new]  # FP target and quantized inputs of this unit only: layer-wise units are many
        self.target = unit_outputs(self.ctx.fp_model, [name], self.crops)[name]
        self.inputs = unit_inputs(self.model, name, self.crops)
        self.weight = unit_fisher(self.ctx.fp_model, name, self.crops, self.hr) if self.hr is not None else None
        self.power = float(self._weighted(self.target).mean().clamp_min(1e-12))
        for q in self.rounding[new]:
            q.hard = False
        if self.drop_prob > 0:
            self.hooks = [q.register_forward_hook(self._drop) for q in self.acts[new]]

    def _drop(self, _q: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        keep_fp = torch.rand(out.shape, generator=self.drop_gen).to(out.device) < self.drop_prob
        return torch.where(keep_fp, inputs[0], out)

    @torch.no_grad()
    def _finish(self, unit: int) -> None:
        rq = self.rounding[unit]
        soft = float(np.mean([q.soft_fraction() for q in rq])) if rq else 0.0
        for q in rq:
            q.hard = True
        mod = self.model.get_submodule(self.units[unit])
        idx = torch.arange(min(self.opt.num_patches, 16))
        args, kwargs = _take(self.inputs, idx)
        err = float((mod(*args, **kwargs) - self.target[idx]).pow(2).mean()) / self.power
        self.ctx.logger.info("recon %s: relative output MSE %.3e with hard rounding (soft share at the end %.3f)",
                             self.units[unit], err, soft)
        self.ctx.summary.setdefault("recon_units", {})[self.units[unit]] = {"rel_mse": err, "soft_share": soft}

    def batch(self, it: int, rng: np.random.Generator) -> torch.Tensor:
        self.local_it = (it - 1) % self.opt.iters_per_block + 1
        self.drop_gen.manual_seed(self.ctx.opts.manual_seed * 1_000_003 + it)  # resume-exact masks
        return torch.from_numpy(rng.choice(self.opt.num_patches, self.opt.batch_size, replace=False))

    def beta(self) -> Optional[float]:
        """The regulariser's exponent at this iteration of the unit, None during its warm-up."""
        warm = int(self.opt.round_warmup * self.opt.iters_per_block)
        if self.local_it <= warm:
            return None
        start, end = self.opt.beta
        return end + (start - end) * (1 - (self.local_it - warm) / (self.opt.iters_per_block - warm))

    def _weighted(self, diff: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Squared error, Fisher-weighted when ``recon.weighting`` is fisher."""
        if self.weight is None:
            return diff.pow(2)
        return diff.pow(2) * (self.weight if idx is None else self.weight[idx])

    def loss(self, idx: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        args, kwargs = _take(self.inputs, idx)
        mod = self.model.get_submodule(self.units[self.unit])
        rec = self._weighted(mod(*args, **kwargs) - self.target[idx], idx).mean() / self.power
        beta, rq = self.beta(), self.rounding[self.unit]
        reg = torch.zeros(())
        if beta is not None and rq:
            reg = sum(q.regularizer(beta) for q in rq) / sum(q.rounding.numel() for q in rq)
        return rec + self.opt.round_weight * reg, {"rec": rec.item(), "round": float(reg.detach())}


def reconstruct(ctx: PTQContext, layerwise: bool, drop_prob: float) -> nn.Module:
    opt = ctx.opts.recon
    if opt.conditioning:
        model = conditioned_quantized(ctx)
    else:
        model = ctx.quantized_copy()
        if ctx.resume is None:
            ctx.init_bounds(model, "dobi")
    scales = step_scales(model, opt.lr_scale, (opt.act_lr or opt.lr) / opt.lr)  # activation bounds' ranges
    attach_rounding(model)
    r, chunk, rng = ctx.input_range, ctx.opts.calib.chunk_size, np.random.default_rng(ctx.opts.calib.seed + 1)
    hr = None
    if opt.weighting == "fisher":  # the task loss needs the HR crops (not augmented: the pairs are as stored)
        lr, high = ctx.calib.random_pairs(opt.num_patches, opt.patch_size, rng)
        crops = [c.to(ctx.device) * r for c in lr.split(chunk)]
        hr = [c.to(ctx.device) * r for c in high.split(chunk)]
    else:
        crops = [c.to(ctx.device) * r for c in ctx.calib.random_crops(
            opt.num_patches, opt.patch_size, rng, opt.augment).split(chunk)]
    units = reconstruction_units(model, ctx, layerwise, crops[0][:1])
    ctx.logger.info("recon: %d units (%s)", len(units), ", ".join(units))
    rec = _Reconstruction(model, ctx, units, crops, drop_prob, hr)
    groups = rec.groups()
    for q in (q for rq in rec.rounding for q in rq):
        scales[id(q.rounding)] = torch.ones(())
    n = opt.iters_per_block
    loop_opt = replace(opt, total_iter=n * len(units))
    phase = Phase(groups, scales, active=lambda it: (it - 1) // n, lr_factor=lambda _g, _it: 1.0,
                  labels=units, batch=rec.batch, switch=rec.switch)
    model = train_loop(model, ctx, loop_opt, phase, rec.loss, "recon")
    return bake_rounding(model)


def adaround(ctx: PTQContext) -> nn.Module:
    return reconstruct(ctx, layerwise=True, drop_prob=0.0)


def brecq(ctx: PTQContext) -> nn.Module:
    return reconstruct(ctx, layerwise=False, drop_prob=0.0)


def qdrop(ctx: PTQContext) -> nn.Module:
    return reconstruct(ctx, layerwise=False, drop_prob=ctx.opts.recon.drop_prob)
