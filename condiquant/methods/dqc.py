"""DQC: distil the quantizer bounds against the FP teacher (2DQuant, Eq. 4-6). Only bounds are trained.

L = L_O + lambda * L_F, with L_O the mean absolute output difference and L_F a distance between per-sample
L2-normalised block outputs (the norms detached, as in the released code). No ground truth is used. The loop
itself (crops, Adam, EMA, validation, checkpoints, resume, selection) is ``condiquant/engine/loop.py``.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from condiquant.engine.loop import Phase, capture, train_loop, warmup_cosine
from condiquant.methods.context import PTQContext
from condiquant.quant.attach import bound_parameters, step_scales


def _normalised(f: torch.Tensor) -> torch.Tensor:
    f = f.flatten(1)
    return f / f.norm(dim=1, keepdim=True).detach().clamp_min(1e-12)


def feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    total = torch.zeros(())
    for name, t in teacher.items():
        s = student[name]
        s_n, t_n = _normalised(s), _normalised(t)
        if kind == "paper":  # Eq. 5: ||.||_2 per sample, divided by C*H*W, averaged over the batch
            total = total + ((s_n - t_n).norm(dim=1) / s_n.shape[1]).mean()
        else:  # released code: MSE(mean) of the normalised features, divided by the batch tensor's size
            total = total + F.mse_loss(s_n, t_n) / s.numel()
    return total


def output_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    l1 = F.l1_loss(out, target)
    return l1 if kind == "paper" else l1 / out.numel() * out.shape[0]


def distill(model: nn.Module, ctx: PTQContext) -> nn.Module:
    """Train the bounds of ``model`` (already initialised, or restored on resume) against ``ctx.fp_model``."""
    opt = ctx.opts.dqc
    teacher, r = ctx.fp_model, ctx.input_range
    patterns = ctx.quant.placement.feature_modules
    scales = step_scales(model, opt.lr_scale, (opt.act_lr or opt.lr) / opt.lr)
    phase = Phase([bound_parameters(model)], scales, active=lambda it: 0,
                  lr_factor=warmup_cosine(opt, opt.scheduler == "cosine"))
    with capture(teacher, patterns) as t_feats, capture(model, patterns) as s_feats:
        def loss_fn(lq: torch.Tensor):
            with torch.no_grad():
                target = teacher(lq) / r
            l_out = output_loss(model(lq) / r, target, opt.loss)
            l_feat = feature_loss(s_feats, t_feats, opt.loss)
            return l_out + opt.feature_weight * l_feat, {"l_out": l_out.item(), "l_feat": l_feat.item()}

        return train_loop(model, ctx, opt, phase, loss_fn, "DQC")
