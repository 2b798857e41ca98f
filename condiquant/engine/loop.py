"""The one loop that trains quantizer parameters against a loss: DQC, SAFT and block reconstruction are instances.

It owns what every trained method needs: random calibration crops (seeded), one Adam per parameter group with
a per-iteration lr factor, optional range-relative steps, an exponential moving average (EMA) of the trained
parameters, validation on the calibration split, atomic checkpoints, resume (refusing a state made with other
options) and model selection (never on a test set).

Why range-relative steps and the EMA (``lr_scale: range``, ``ema_decay``): quantizer bounds span four orders of
magnitude (0.004 to 20 on IMDN/EMT), so one absolute Adam lr moves small bounds by their whole range per step
and large ones not at all; Adam's first steps are ~lr * sign(g), so float reduction order alone (thread count)
sends same-seed runs apart. Steps proportional to each bound's initial range, a warm-up and averaging the last
iterates (instead of picking the best of a few noisy checkpoints) make the end point a smooth function of the
data; ``lr_scale: absolute`` with ``ema_decay: 0`` is the paper's DQC.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from condiquant import metrics
from condiquant.engine.state import atomic_torch_save, options_record, read_state
from condiquant.scoring import to_uint8
from condiquant.options import LoopOptions
from condiquant.quant.checkpoint import save_quantized
from condiquant.quant.patterns import matches

if TYPE_CHECKING:  # the methods package imports this module
    from condiquant.methods.context import PTQContext

# (loss, scalars to log) for one batch: LR crops already scaled to the model's input range, or what
# ``Phase.batch`` draws (e.g. indices into cached block inputs)
LossFn = Callable[[torch.Tensor], Tuple[torch.Tensor, Dict[str, float]]]
Best = Tuple[float, int]  # (calibration-validation PSNR, iteration)


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


@torch.no_grad()
def validation_psnr(model: nn.Module, ctx: PTQContext) -> float:
    """Mean Y-PSNR against HR on the calibration validation split (held-out images, never a test set)."""
    s = ctx.opts.scale
    scores = []
    for lq, hr in ctx.calib.val_pairs(ctx.opts.calib.val_patch_size):
        sr = model(lq.to(ctx.device) * ctx.input_range) / ctx.input_range
        scores.append(metrics.psnr(to_uint8(sr), hr, crop_border=s))
    return float(np.mean(scores))


class ScaledAdam(torch.optim.Adam):
    """Adam whose step for each element is multiplied by a fixed ``scale`` tensor (e.g. the element's initial
    range: then it is Adam on the bounds in units of their range), without changing the parameters the model and
    its checkpoints hold."""

    def __init__(self, params: Sequence[nn.Parameter], scales: Sequence[torch.Tensor], **kwargs):
        super().__init__(params, **kwargs)
        self._scales = list(scales)

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in params]
        loss = super().step(closure)
        for p, b, s in zip(params, before, self._scales):
            p.copy_(b + (p - b) * s)
        return loss


def _scales(params: Sequence[nn.Parameter], scales: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
    return [scales[id(p)].expand_as(p).clone() for p in params]


@dataclass
class Phase:
    """What the loop trains: parameter groups (one Adam each), which group a given iteration updates, and the
    factor on ``lr`` of group g at iteration it (1-based).

    ``batch(it, rng)``: the loss input of iteration ``it`` (default: random calibration crops). ``switch(old, new)``
    is called whenever the trained group changes: before the first iteration (old None; also after a resume), between
    groups, and after the last iteration (new None, before the final validation and checkpoint)."""

    groups: List[List[nn.Parameter]]
    scales: Dict[int, torch.Tensor]  # id(param) -> per-element step factor (quant.attach.step_scales)
    active: Callable[[int], int]
    lr_factor: Callable[[int, int], float]
    labels: Sequence[str] = ("bounds",)
    batch: Optional[Callable[[int, np.random.Generator], torch.Tensor]] = None
    switch: Optional[Callable[[Optional[int], Optional[int]], None]] = None


def warmup_cosine(opt: LoopOptions, cosine: bool) -> Callable[[int, int], float]:
    def factor(_g: int, it: int) -> float:
        warm = min(1.0, it / opt.warmup_iter) if opt.warmup_iter > 0 else 1.0
        cos = 0.5 * (1 + math.cos(math.pi * min(it, opt.total_iter) / opt.total_iter)) if cosine else 1.0
        return warm * cos
    return factor


class _EMA:
    """Exponential moving average of the trained parameters; ``applied()`` puts it into the model and back."""

    def __init__(self, params: List[nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


def latest_state(exp_dir: Path) -> Optional[Path]:
    """The newest ``training_states/<iter>.state`` (atomic writes: a file there is always complete)."""
    states = sorted((exp_dir / "training_states").glob("*.state"), key=lambda p: int(p.stem))
    return states[-1] if states else None


def train_loop(model: nn.Module, ctx: PTQContext, opt: LoopOptions, phase: Phase, loss_fn: LossFn,
               desc: str) -> nn.Module:
    """Train ``phase.groups`` of ``model`` (bounds already initialised) for ``opt.total_iter`` updates; returns
    the selected model (``opt.select``: the last iterate, its EMA, or the best-validation checkpoint)."""
    params = [p for g in phase.groups for p in g]
    for p in model.parameters():
        p.requires_grad_(False)
    kwargs = dict(lr=opt.lr, betas=tuple(opt.betas), eps=1e-8, weight_decay=0.0)
    plain = opt.lr_scale == "absolute" and opt.act_lr is None  # every factor 1: Adam itself, to the last bit
    optimizers = [torch.optim.Adam(g, **kwargs) if plain else ScaledAdam(g, _scales(g, phase.scales), **kwargs)
                  for g in phase.groups]
    ema = _EMA(params, opt.ema_decay) if opt.ema_decay > 0 else None
    rng = np.random.default_rng(ctx.opts.manual_seed + 1)
    record = options_record(ctx.opts)  # run_train has checked a resumed state against it
    start, best = 0, (-float("inf"), -1)
    if ctx.resume is not None:
        start, best = _load_state(ctx.resume, model, optimizers, ema, rng, ctx)
    else:
        best = (validation_psnr(model, ctx), 0)
        ctx.logger.info("iter 0: calibration-validation PSNR %.3f dB", best[0])
        ctx.summary["val_psnr_iter0"] = best[0]
        save_quantized(ctx.exp_dir / "models" / "net_q_0.pth", model, ctx.opts.network_g, ctx.quant)

    from torch.utils.tensorboard import SummaryWriter  # heavy import, only when training
    writer = SummaryWriter(str(Path("tb_logger") / ctx.opts.name))
    r = ctx.input_range
    tic = time.perf_counter()
    before = ctx.summary.get("seconds_before_resume", 0.0)
    model.train(False)  # BatchNorm/Dropout stay in inference mode; only quantizer parameters learn
    current: Optional[int] = None
    for it in tqdm(range(start + 1, opt.total_iter + 1), initial=start, total=opt.total_iter, desc=desc):
        g = phase.active(it)
        if g != current and phase.switch is not None:
            phase.switch(current, g)
        current = g
        for i, group in enumerate(phase.groups):  # gradients only for the group this iteration trains
            for p in group:
                p.requires_grad_(i == g)
        if phase.batch is not None:
            x = phase.batch(it, rng)
        else:
            x = ctx.calib.random_crops(opt.batch_size, opt.patch_size, rng, opt.augment).to(ctx.device) * r
        loss, logs = loss_fn(x)
        lr = opt.lr * phase.lr_factor(g, it)  # derived from the iteration: nothing to save for a resume
        for pg in optimizers[g].param_groups:
            pg["lr"] = lr
        optimizers[g].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[g].step()
        if ema is not None:
            ema.update()
        if it == opt.total_iter and phase.switch is not None:
            phase.switch(current, None)
        if it % opt.print_freq == 0 or it == opt.total_iter:
            for k, v in logs.items():
                writer.add_scalar(f"losses/{k}", v, it)
            ctx.logger.info("[%s][iter %d/%d %s, lr %.2e] %s (%.2f s/iter)", ctx.opts.name, it, opt.total_iter,
                            phase.labels[g], lr,
                            " ".join(f"{k} {v:.6f}" for k, v in logs.items()),
                            (time.perf_counter() - tic) / (it - start))
        if it % opt.val_freq == 0 or it == opt.total_iter:
            with ema.applied() if ema is not None else nullcontext():
                psnr = validation_psnr(model, ctx)
            writer.add_scalar("metrics/calib_val_psnr", psnr, it)
            if it == opt.total_iter and opt.select == "last":  # the returned model's score: no second pass
                ctx.summary["val_psnr"] = psnr
            ctx.logger.info("iter %d: calibration-validation PSNR %.3f dB%s", it, psnr, " (EMA)" if ema else "")
            if psnr > best[0]:
                best = (psnr, it)
        if it % opt.save_checkpoint_freq == 0 or it == opt.total_iter:
            with ema.applied() if ema is not None else nullcontext():
                save_quantized(ctx.exp_dir / "models" / f"net_q_{it}.pth", model, ctx.opts.network_g, ctx.quant)
            ctx.summary["loop_seconds"] = before + time.perf_counter() - tic
            _save_state(ctx, it, model, optimizers, ema, rng, best, record)
    writer.close()
    for p in params:
        p.requires_grad_(False)
    if ema is not None:  # the model carries the averaged parameters from here on
        with torch.no_grad():
            for p, s in zip(params, ema.shadow):
                p.copy_(s)
    if opt.select == "best_val" and best[1] != opt.total_iter:
        path = ctx.exp_dir / "models" / f"net_q_{best[1]}.pth"
        if not path.is_file():
            raise RuntimeError(f"select best_val needs {path}: make val_freq a multiple of save_checkpoint_freq")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["params"])
        ctx.logger.info("selected iteration %d by calibration-validation PSNR %.3f dB", best[1], best[0])
    ctx.summary["selected_iter"] = best[1] if opt.select == "best_val" else opt.total_iter
    if opt.select == "best_val" and best[1] >= 0:
        ctx.summary["val_psnr"] = best[0]
    return model


def _save_state(ctx: PTQContext, it: int, model: nn.Module, optimizers, ema: Optional[_EMA],
                rng: np.random.Generator, best: Best, record: dict) -> None:
    state = {"params": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
             # step factors come from the initial bounds, which a resumed run no longer has
             "scales": [getattr(o, "_scales", None) for o in optimizers],
             "ema": ema.shadow if ema is not None else None,
             "rng": rng.bit_generator.state, "iter": it, "best": list(best), "options": record,
             "summary": dict(ctx.summary)}
    atomic_torch_save(state, ctx.exp_dir / "training_states" / f"{it}.state")


def _load_state(path: Path, model: nn.Module, optimizers, ema: Optional[_EMA],
                rng: np.random.Generator, ctx: PTQContext) -> Tuple[int, Best]:
    state = read_state(path)
    model.load_state_dict(state["params"])
    for o, s, scales in zip(optimizers, state["optimizers"], state["scales"]):
        o.load_state_dict(s)
        if scales is not None:
            o._scales = scales
    if ema is not None:
        for dst, src in zip(ema.shadow, state["ema"]):
            dst.copy_(src)
    rng.bit_generator.state = state["rng"]
    ctx.summary.update(state.get("summary", {}))
    ctx.summary["seconds_before_resume"] = ctx.summary.get("loop_seconds", 0.0)
    ctx.logger.info("resumed from %s at iteration %d", path, state["iter"])
    return state["iter"], tuple(state["best"])
