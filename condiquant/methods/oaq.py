"""OAQ (Wang et al., ICCV 2025; papers.md §3): dual-region activations, then sensitivity-aware finetuning (SAFT).

Bounds: DOBI for the weights (OAQ uses an 'omse' symmetric search; DOBI is the same kind of range search) and
for uniform MatMul inputs; min/max + percentile breakpoints for the dual-region Linear/Conv2d inputs.

SAFT trains quantizer parameters only, against the FP model, without ground truth or test data:
L = sum_k s_k * w_sen * ||F_k/|F_k| - Fq_k/|Fq_k|||_2 / (B K) + lambda * L1(FP output, quantized output).
The paper's sensitivity is per quantized layer: s_l = softmax over layers of the std of layer l's FP input. A
raw std is not scale-free (EMT's inputs are x255: one layer would take all the weight), so each std is divided
by the mean std over layers first; the features are block outputs (the placement's ``feature_modules``, as the
released code's residual blocks), and block k's weight s_k is the sum of its layers' s_l. Epochs cycle through
the parameter groups (weight bounds, activation bounds, breakpoints) on the shared training loop
(``condiquant/engine/loop.py``); selection uses the calibration validation split, never a test set.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.engine.loop import Phase, capture, train_loop
from condiquant.methods.condiquant import conditioned_quantized
from condiquant.methods.context import PTQContext
from condiquant.quant.attach import named_quantizers, select_modules, step_scales, weight_quantizer_inputs
from condiquant.quant.patterns import matches
from condiquant.transforms.conditioning import forward_with_input_hooks

GROUPS = ("weight bounds", "activation bounds", "breakpoints")


def layer_input_stds(model: nn.Module, names: List[str], batches: Iterable[torch.Tensor],
                     input_range: float = 1.0) -> Dict[str, float]:
    """Mean over samples of the per-sample std over (C, H, W) of each named module's input."""
    sums: Dict[str, float] = {n: 0.0 for n in names}
    counts: Dict[str, int] = {n: 0 for n in names}

    def record(name: str):
        def hook(_m: nn.Module, x: torch.Tensor) -> None:
            std = x.flatten(1).std(dim=1, correction=0)  # population std: a 1x1x1 input has 0
            sums[name] += float(std.sum())
            counts[name] += std.numel()
        return hook

    forward_with_input_hooks(model, [(model.get_submodule(n), record(n)) for n in names], batches, input_range)
    return {n: sums[n] / counts[n] for n in names if counts[n]}


def sensitivity_weights(stds: Dict[str, float], blocks: List[str]) -> Dict[str, float]:
    """Block weights from per-layer input stds: softmax over layers of std / mean std (scale-free), summed per
    block (a layer belongs to the block its name starts with), renormalised over the blocks."""
    if not blocks:  # no feature modules (e.g. a user's arch without them): the output term alone
        return {}
    names = list(stds)
    rel = torch.tensor([stds[n] for n in names], dtype=torch.float64)
    s_layer = torch.softmax(rel / rel.mean().clamp_min(1e-30), dim=0).tolist()
    per_block = {b: sum(s for n, s in zip(names, s_layer) if n.startswith(b + ".")) for b in blocks}
    total = sum(per_block.values())
    if total <= 0:
        raise ValueError("SAFT: no quantized layer lies inside the feature modules")
    return {b: v / total for b, v in per_block.items()}


def sensitivity_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor],
                     sensitivity: Dict[str, float], weight: float) -> torch.Tensor:
    """sum_k s_k * weight * ||t/|t| - s/|s|||_2 / (B K), features normalised over the whole batch (OAQ code)."""
    total = torch.zeros(())
    for name, t in teacher.items():
        diff = t.flatten() / t.norm() - student[name].flatten() / student[name].norm()
        total = total + sensitivity[name] * weight * diff.norm()
    return total / (next(iter(teacher.values())).shape[0] * len(teacher)) if teacher else total


def parameter_groups(model: nn.Module) -> List[List[nn.Parameter]]:
    """[weight bounds, activation bounds (l_a, u_a, incl. uniform MatMul inputs), breakpoints]."""
    weight_names = {name for name, _, _ in weight_quantizer_inputs(model)}
    groups: List[List[nn.Parameter]] = [[], [], []]
    for name, q in named_quantizers(model):
        for pname, p in q.named_parameters():  # a symmetric weight grid has only ``upper``
            groups[2 if pname == "breakpoint" else 0 if name in weight_names else 1].append(p)
    for label, group in zip(GROUPS, groups):
        if not group:
            raise ValueError(f"SAFT: the model has no {label} to train (needs quant.a_quantizer: dual_region)")
    return groups


def _epoch_lr(gamma: float, iters_per_epoch: int, n_groups: int):
    """Group g's lr factor at iteration it: gamma ** (epochs g has already trained)."""
    def factor(g: int, it: int) -> float:
        done = (it - 1) // iters_per_epoch  # completed epochs before this one
        return gamma ** sum(1 for e in range(done) if e % n_groups == g)
    return factor


def saft(model: nn.Module, ctx: PTQContext) -> nn.Module:
    """Finetune the quantizer parameters of ``model`` (initialised) against ``ctx.fp_model``; returns it."""
    opt = ctx.opts.saft
    teacher, r = ctx.fp_model, ctx.input_range
    patterns = ctx.quant.placement.feature_modules
    layers = [s.name for s in select_modules(teacher, ctx.quant) if s.kind in ("Linear", "Conv2d")]
    blocks = [n for n, _ in teacher.named_modules() if n and matches(n, patterns)]
    stds = layer_input_stds(teacher, layers, ctx.calibration_batches(), r)
    sensitivity = sensitivity_weights(stds, blocks)
    ctx.logger.info("SAFT sensitivity: %s", ", ".join(f"{n} {s:.4f}" for n, s in sensitivity.items()))
    groups = parameter_groups(model)
    ipe = opt.total_iter // opt.epochs
    scales = step_scales(model, opt.lr_scale, (opt.act_lr or opt.lr) / opt.lr)
    phase = Phase(groups, scales, active=lambda it: ((it - 1) // ipe) % len(groups),
                  lr_factor=_epoch_lr(opt.gamma, ipe, len(groups)), labels=GROUPS)
    with capture(teacher, patterns) as t_feats, capture(model, patterns) as s_feats:
        def loss_fn(lq: torch.Tensor):
            with torch.no_grad():
                target = teacher(lq) / r
            l_rec = F.l1_loss(model(lq) / r, target)
            l_sen = sensitivity_loss(s_feats, t_feats, sensitivity, opt.sen_weight)
            return l_sen + opt.rec_weight * l_rec, {"l_rec": l_rec.item(), "l_sen": l_sen.item()}

        return train_loop(model, ctx, opt, phase, loss_fn, "SAFT")


def run(ctx: PTQContext) -> nn.Module:
    model = ctx.quantized_copy()
    if ctx.resume is None:
        ctx.init_bounds(model, "dobi")
    return saft(model, ctx)


def run_conditioned(ctx: PTQContext) -> nn.Module:
    """CondiQuant's weight conditioning passes first (``conditioning:``), then OAQ."""
    return saft(conditioned_quantized(ctx), ctx)
