"""DQC: distil the quantizer bounds against the FP teacher (2DQuant, Eq. 4-6). Only bounds are trained.

L = L_O + lambda * L_F, with L_O the mean absolute output difference and L_F a distance between
per-sample L2-normalised block outputs. No ground truth is used. Checkpoints and the full training state
(optimizer, scheduler, RNG) are saved regularly, so an interrupted CPU run resumes where it stopped.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from condiquant import metrics
from condiquant.evaluate import to_uint8
from condiquant.methods.context import PTQContext
from condiquant.options import DQCOptions
from condiquant.quant.attach import bound_parameters
from condiquant.quant.checkpoint import save_quantized
from condiquant.quant.patterns import matches


@contextmanager
def capture(model: nn.Module, patterns: List[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Record the outputs of modules whose names match ``patterns`` on every forward."""
    feats: Dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if name and matches(name, patterns):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, name=name: feats.__setitem__(name, out)))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def feature_loss(student: Dict[str, torch.Tensor], teacher: Dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    total = torch.zeros(())
    for name, t in teacher.items():
        s = student[name]
        t_n = F.normalize(t.flatten(1), dim=1)
        s_n = F.normalize(s.flatten(1), dim=1)
        per_elem = t_n.shape[1]
        if kind == "l2":  # paper Eq. 5: ||.||_2 per sample, divided by C*H*W, averaged over the batch
            total = total + ((s_n - t_n).norm(dim=1) / per_elem).mean()
        else:  # released code: MSE of the normalised features, divided again by their size
            total = total + F.mse_loss(s_n, t_n) / per_elem
    return total


@torch.no_grad()
def validation_psnr(model: nn.Module, ctx: PTQContext) -> float:
    """Mean Y-PSNR against HR on the calibration validation split (held-out images, never a test set)."""
    s = ctx.opts.scale
    scores = []
    for lq, hr in ctx.calib.val_pairs(ctx.opts.calib.val_patch_size):
        sr = model(lq.to(ctx.device) * ctx.input_range) / ctx.input_range
        scores.append(metrics.psnr(to_uint8(sr), hr, crop_border=s))
    return float(np.mean(scores))


def _lr_lambda(opt: DQCOptions):
    if opt.scheduler == "cosine":
        return lambda it: 0.5 * (1 + math.cos(math.pi * min(it, opt.total_iter) / opt.total_iter))
    return lambda it: 1.0


def latest_state(exp_dir: Path) -> Optional[Path]:
    states = sorted((exp_dir / "training_states").glob("*.state"), key=lambda p: int(p.stem))
    return states[-1] if states else None


Best = Tuple[float, int]  # (calibration-validation PSNR, iteration)


def load_state(path: Path, model: nn.Module, stateful: Dict[str, Any], rng: np.random.Generator,
               ctx: PTQContext) -> Tuple[int, Best]:
    """Restore a training state written by :func:`save_checkpoint`; returns (iteration, best)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG objects
    model.load_state_dict(state["params"])
    for key, obj in stateful.items():  # optimizers and schedulers
        obj.load_state_dict(state[key])
    rng.bit_generator.state = state["rng"]
    ctx.logger.info("resumed from %s at iteration %d", path, state["iter"])
    return state["iter"], tuple(state["best"])


def save_checkpoint(model: nn.Module, ctx: PTQContext, it: int, stateful: Dict[str, Any],
                    rng: np.random.Generator, best: Best) -> None:
    """``models/net_q_<it>.pth`` and ``training_states/<it>.state`` (everything a resume needs)."""
    save_quantized(ctx.exp_dir / "models" / f"net_q_{it}.pth", model, ctx.opts.network_g, ctx.quant)
    state_path = ctx.exp_dir / "training_states" / f"{it}.state"
    state_path.parent.mkdir(exist_ok=True)
    torch.save({"params": model.state_dict(), **{k: v.state_dict() for k, v in stateful.items()},
                "rng": rng.bit_generator.state, "iter": it, "best": list(best)}, state_path)


def initial_candidate(model: nn.Module, ctx: PTQContext) -> Best:
    """The initial bounds are a candidate too: training must beat them on validation to be kept."""
    best = (validation_psnr(model, ctx), 0)
    ctx.logger.info("iter 0: calibration-validation PSNR %.3f dB", best[0])
    save_quantized(ctx.exp_dir / "models" / "net_q_0.pth", model, ctx.opts.network_g, ctx.quant)
    return best


def select_checkpoint(model: nn.Module, ctx: PTQContext, best: Best, last: int, hint: str) -> None:
    """Load the best-validation checkpoint into ``model`` unless it is the last one."""
    if best[1] == last:
        return
    path = ctx.exp_dir / "models" / f"net_q_{best[1]}.pth"
    if not path.is_file():
        raise RuntimeError(f"best_val selection needs {path}: {hint}")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["params"])
    ctx.logger.info("selected iteration %d by calibration-validation PSNR %.3f dB", best[1], best[0])


def distill(model: nn.Module, ctx: PTQContext, resume: Optional[Path] = None) -> nn.Module:
    """Train the bounds of ``model`` (already initialised) against ``ctx.fp_model``; returns the selected model."""
    opt = ctx.opts.dqc
    teacher = ctx.fp_model
    params = bound_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opt))
    rng = np.random.default_rng(ctx.opts.manual_seed + 1)
    stateful = {"optimizer": optimizer, "scheduler": scheduler}
    start, best = load_state(resume, model, stateful, rng, ctx) if resume is not None else (0, (-float("inf"), -1))

    from torch.utils.tensorboard import SummaryWriter  # heavy import, only when distilling
    writer = SummaryWriter(str(Path("tb_logger") / ctx.opts.name))
    patterns = ctx.quant.placement.feature_modules
    r = ctx.input_range
    if resume is None:
        best = initial_candidate(model, ctx)
    tic = time.perf_counter()
    model.train(False)  # BatchNorm/Dropout stay in inference mode; only bounds learn
    with capture(teacher, patterns) as t_feats, capture(model, patterns) as s_feats:
        for it in tqdm(range(start + 1, opt.total_iter + 1), initial=start, total=opt.total_iter, desc="DQC"):
            lq = ctx.calib.random_crops(opt.batch_size, opt.patch_size, rng, opt.augment).to(ctx.device) * r
            with torch.no_grad():
                target = teacher(lq) / r
            out = model(lq) / r
            l_out = F.l1_loss(out, target)
            l_feat = feature_loss(s_feats, t_feats, opt.feature_loss)
            loss = l_out + opt.feature_weight * l_feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if it % opt.print_freq == 0 or it == opt.total_iter:
                writer.add_scalar("losses/l_out", l_out.item(), it)
                writer.add_scalar("losses/l_feat", l_feat.item(), it)
                ctx.logger.info("[%s][iter %d/%d, lr %.2e] l_out %.5f l_feat %.6f (%.2f s/iter)", ctx.opts.name, it,
                                opt.total_iter, scheduler.get_last_lr()[0], l_out.item(), l_feat.item(),
                                (time.perf_counter() - tic) / (it - start))
            if it % opt.val_freq == 0 or it == opt.total_iter:
                psnr = validation_psnr(model, ctx)
                writer.add_scalar("metrics/calib_val_psnr", psnr, it)
                ctx.logger.info("iter %d: calibration-validation PSNR %.3f dB", it, psnr)
                if psnr > best[0]:
                    best = (psnr, it)
            if it % opt.save_checkpoint_freq == 0 or it == opt.total_iter:
                save_checkpoint(model, ctx, it, stateful, rng, best)
    writer.close()
    for p in params:
        p.requires_grad_(False)
    if opt.select == "best_val":
        select_checkpoint(model, ctx, best, opt.total_iter, "make val_freq a multiple of save_checkpoint_freq")
    return model
