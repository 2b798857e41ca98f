"""OAQ (Wang et al., ICCV 2025; papers.md §3): dual-region activations, then sensitivity-aware finetuning (SAFT).

Bounds: DOBI for the weights (OAQ uses an 'omse' symmetric search; DOBI is the same kind of range search) and
for uniform MatMul inputs; min/max + percentile-of-|x| breakpoints for the dual-region Linear/Conv2d inputs.

SAFT trains quantizer parameters only, against the FP model, without ground truth or test data:
L = sum_k s_k * w_sen * ||F_k/|F_k| - Fq_k/|Fq_k|||_2 / (B K) + lambda * L1(FP output, quantized output).
The paper defines s_k per layer and takes features at residual-block outputs; here k runs over the placement's
``feature_modules`` (the blocks), and a block's sensitivity is the softmax over blocks of the mean per-sample
std of the block's FP input. Epoch e >= 1 trains one parameter group, (e - 1) mod 3: weight bounds,
activation bounds, breakpoints. Model selection uses the calibration validation split, never a test set.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from condiquant.methods.condiquant import conditioned_quantized
from condiquant.methods.context import PTQContext
from condiquant.methods.dqc import (capture, initial_candidate, load_state, save_checkpoint, select_checkpoint,
                                    validation_psnr)
from condiquant.quant.attach import named_quantizers, weight_quantizer_inputs
from condiquant.quant.dual_region import DualRegionQuantizer
from condiquant.quant.patterns import matches

GROUPS = ("weight bounds", "activation bounds", "breakpoints")


@torch.no_grad()
def block_sensitivity(model: nn.Module, patterns: List[str], batches: Iterable[torch.Tensor]) -> Dict[str, float]:
    """softmax over the matched modules of the mean (over samples) per-sample std over (C, H, W) of their input."""
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}

    def hook(name: str):
        def record(_m: nn.Module, inputs: tuple) -> None:
            std = inputs[0].flatten(1).std(dim=1)
            sums[name] = sums.get(name, 0.0) + float(std.sum())
            counts[name] = counts.get(name, 0) + std.numel()
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if n and matches(n, patterns)]
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in handles:
            h.remove()
    names = list(sums)
    weights = torch.softmax(torch.tensor([sums[n] / counts[n] for n in names], dtype=torch.float64), dim=0)
    return dict(zip(names, weights.tolist()))


def sensitivity_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                     sensitivity: Dict[str, float], weight: float) -> torch.Tensor:
    """sum_k s_k * weight * ||t/|t| - s/|s|||_2 / (B K), features normalised over the whole batch (OAQ code)."""
    total = torch.zeros(())
    for name, t in teacher.items():
        diff = t.flatten() / t.norm() - student[name].flatten() / student[name].norm()
        total = total + sensitivity[name] * weight * diff.norm()
    batch = next(iter(teacher.values())).shape[0]
    return total / (batch * len(teacher))


def parameter_groups(model: nn.Module) -> List[List[nn.Parameter]]:
    """[weight bounds, activation bounds (l_a, u_a, incl. uniform MatMul inputs), breakpoints]."""
    weight_names = {name for name, _, _ in weight_quantizer_inputs(model)}
    groups: List[List[nn.Parameter]] = [[], [], []]
    for name, q in named_quantizers(model):
        groups[0 if name in weight_names else 1] += [q.lower, q.upper]
        if isinstance(q, DualRegionQuantizer):
            groups[2].append(q.breakpoint)
    for label, group in zip(GROUPS, groups):
        if not group:
            raise ValueError(f"SAFT: the model has no {label} to train (needs quant.a_quantizer: dual_region)")
    return groups


def saft(model: nn.Module, ctx: PTQContext, resume: Optional[Path] = None) -> nn.Module:
    """Finetune the quantizer parameters of ``model`` (initialised) against ``ctx.fp_model``; returns it."""
    opt = ctx.opts.saft
    teacher, r = ctx.fp_model, ctx.input_range
    patterns = ctx.quant.placement.feature_modules
    sensitivity = block_sensitivity(teacher, patterns, [b * r for b in ctx.calibration_batches()])
    ctx.logger.info("SAFT sensitivity: %s", ", ".join(f"{n} {s:.4f}" for n, s in sensitivity.items()))
    groups = parameter_groups(model)
    for p in model.parameters():
        p.requires_grad_(False)
    optimizers = [torch.optim.Adam(g, lr=opt.lr, betas=tuple(opt.betas), eps=1e-8) for g in groups]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=opt.gamma) for o in optimizers]
    stateful = {**{f"optimizer{i}": o for i, o in enumerate(optimizers)},
                **{f"scheduler{i}": s for i, s in enumerate(schedulers)}}
    rng = np.random.default_rng(ctx.opts.manual_seed + 1)
    total = opt.epochs * opt.iters_per_epoch
    if resume is None:
        start, best = 0, initial_candidate(model, ctx)
    else:
        start, best = load_state(resume, model, stateful, rng, ctx)
    tic = time.perf_counter()
    model.train(False)
    with capture(teacher, patterns) as t_feats, capture(model, patterns) as s_feats:
        for it in tqdm(range(start + 1, total + 1), initial=start, total=total, desc="SAFT"):
            epoch = (it - 1) // opt.iters_per_epoch + 1
            g = (epoch - 1) % len(groups)
            for i, group in enumerate(groups):  # gradients only for the group this epoch trains
                for p in group:
                    p.requires_grad_(i == g)
            lq = ctx.calib.random_crops(opt.batch_size, opt.patch_size, rng, opt.augment).to(ctx.device) * r
            with torch.no_grad():
                target = teacher(lq) / r
            out = model(lq) / r
            l_rec = F.l1_loss(out, target)
            l_sen = sensitivity_loss(s_feats, t_feats, sensitivity, opt.sen_weight)
            loss = l_sen + opt.rec_weight * l_rec
            optimizers[g].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[g].step()
            if it % opt.print_freq == 0:
                ctx.logger.info("[%s][epoch %d %s, iter %d/%d, lr %.2e] l_rec %.5f l_sen %.6f (%.2f s/iter)",
                                ctx.opts.name, epoch, GROUPS[g], it, total, schedulers[g].get_last_lr()[0],
                                l_rec.item(), l_sen.item(), (time.perf_counter() - tic) / (it - start))
            if it % opt.iters_per_epoch == 0:
                schedulers[g].step()
                psnr = validation_psnr(model, ctx)
                ctx.logger.info("epoch %d: calibration-validation PSNR %.3f dB", epoch, psnr)
                if psnr > best[0]:
                    best = (psnr, it)
                save_checkpoint(model, ctx, it, stateful, rng, best)
    for p in model.parameters():
        p.requires_grad_(False)
    if opt.select == "best_val":
        select_checkpoint(model, ctx, best, total, "every epoch is checkpointed")
    return model


def run(ctx: PTQContext) -> nn.Module:
    model = ctx.quantized_copy()
    if ctx.resume is None:
        ctx.init_bounds(model, "dobi")
    return saft(model, ctx, ctx.resume)


def run_conditioned(ctx: PTQContext) -> nn.Module:
    """CondiQuant's weight conditioning passes first (``conditioning:``), then OAQ."""
    return saft(conditioned_quantized(ctx), ctx, ctx.resume)
