"""PTQ4ViT (Yuan et al., ECCV 2022): twin-uniform grids and a Hessian-guided search of every scaling factor.

From the paper and its released code (facts only): every quantizer is symmetric, x_q = clamp(round(x / d),
-2^(b-1), 2^(b-1) - 1) d, starting from d0 = max|x| / (2^(b-1) - 0.5); post-softmax and post-GELU inputs get the
twin-uniform grids of ``quant/twin.py``. Each layer is calibrated on its FP inputs (all other layers FP), choosing
d among (alpha_min + i (alpha_max - alpha_min) / n) d0, i < n (the split exponent m = 0 .. 19 for the softmax
twin), by the largest -sum((dL/dO * (O_q - O))^2): the output error weighted by the squared gradient of the loss
at the layer output (a diagonal Fisher stand-in for the Hessian); weights, then inputs, for ``rounds`` rounds. Per
output channel for per-channel weights (each channel's best candidate); qkv-split Linears per chunk.

Adapted to SR: the loss is the L1 to the HR crop (the released code's KL between FP and FP outputs has a zero
gradient), with paired calibration crops; post-activation twins go on the ``placement.one_direction`` inputs of
Linear/Conv2d layers (post-GELU in SwinIR, post-Swish in EMT) with d_neg = |min| / 2^(b-1); IMDN's LeakyReLU
inputs are left uniform, as PTQ4ViT does for everything but GELU. No training.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from condiquant.methods.context import PTQContext
from condiquant.quant.attach import quant_modules
from condiquant.quant.modules import QuantConv2d, QuantMatMul
from condiquant.quant.quantizer import UniformQuantizer
from condiquant.quant.twin import TwinUniformQuantizer

Chunk = Tuple[Tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]  # (inputs, FP output, dL/dO)
SPLIT_EXPONENTS = 20  # softmax twin: d1 = d2 / 2^m, m = 0 .. 19 (the released code)


@torch.no_grad()
def set_symmetric(q: UniformQuantizer, step: torch.Tensor) -> None:
    half = 2 ** (q.n_bits - 1)
    q.set_bounds(-half * step, (half - 1) * step)


def start_step(q: UniformQuantizer) -> torch.Tensor:
    """d0 = max|x| / (2^(b-1) - 0.5) from the (MinMax) bounds, per channel where the bounds are."""
    return torch.maximum(q.lower.detach().abs(), q.upper.detach().abs()).clamp_min(1e-8) / (2 ** (q.n_bits - 1) - 0.5)


def layer_data(fp: nn.Module, names: List[str], lr: torch.Tensor, hr: torch.Tensor, chunk: int,
               input_range: float) -> Dict[str, List[Chunk]]:
    """Per module: its FP inputs and outputs and the gradient of L1(FP(x), HR) at its output, per chunk."""
    data: Dict[str, List[Chunk]] = {n: [] for n in names}
    seen: Dict[str, list] = {}
    handles = []
    for n in names:
        def hook(_m, args, out, n=n):
            seen[n] = [tuple(a.detach() for a in args), out]
            out.register_hook(lambda g, n=n: seen[n].append(g.detach()))
        handles.append(fp.get_submodule(n).register_forward_hook(hook))
    try:
        for x, y in zip(lr.split(chunk), hr.split(chunk)):
            seen.clear()
            x = (x * input_range).requires_grad_(True)  # frozen weights: the graph is built through the input
            F.l1_loss(fp(x) / input_range, y).backward()
            for n, got in seen.items():
                if len(got) != 3:
                    raise ValueError(f"ptq4vit: module {n} runs more than once per forward")
                data[n].append((got[0], got[1].detach(), got[2]))
    finally:
        for h in handles:
            h.remove()
    return data


def _channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, QuantConv2d) else -1


@torch.no_grad()
def _scores(module: nn.Module, chunks: List[Chunk]) -> torch.Tensor:
    """-sum((g (O_q - O))^2) per output channel."""
    total = None
    dim = _channel_dim(module)
    for args, out, grad in chunks:
        err = (grad * (module(*args) - out)).pow(2)
        s = -err.transpose(0, dim).reshape(err.shape[dim], -1).sum(1)
        total = s if total is None else total + s
    return total


def search_weights(module: nn.Module, chunks: List[Chunk], alphas: np.ndarray, starts: Dict[int, torch.Tensor]) -> None:
    """Weight channel c only feeds output channel c: per-channel quantizers take each channel's best candidate,
    per-tensor ones (one per qkv chunk) the best sum over their chunk's channels."""
    wq = list(module.weight_quantizers)
    scores = []
    for a in alphas:
        for q in wq:
            set_symmetric(q, a * starts[id(q)])
        scores.append(_scores(module, chunks).reshape(len(wq), -1))
    table = torch.stack(scores)  # (candidates, chunks, channels of a chunk)
    for i, q in enumerate(wq):
        s = starts[id(q)]
        if q.channel_axis is None:
            set_symmetric(q, float(alphas[int(table[:, i].sum(1).argmax())]) * s)
        else:
            best = torch.as_tensor(alphas, dtype=s.dtype)[table[:, i].argmax(0)]
            set_symmetric(q, best.reshape(s.shape) * s)


def _input_candidates(q: UniformQuantizer, alphas: np.ndarray, start: torch.Tensor) -> List[Callable[[], None]]:
    if isinstance(q, TwinUniformQuantizer) and q.kind == "softmax":  # the split exponent m
        large = float(q.steps[1])
        return [lambda m=m: q.set_steps(large / 2 ** m, large) for m in range(SPLIT_EXPONENTS)]
    if isinstance(q, TwinUniformQuantizer):  # the positive step; the negative one stays |min| / 2^(b-1)
        neg = float(q.steps[0])
        return [lambda a=a: q.set_steps(neg, float(a * start)) for a in alphas]
    return [lambda a=a: set_symmetric(q, float(a) * start) for a in alphas]


def search_inputs(module: nn.Module, chunks: List[Chunk], qs: List[UniformQuantizer], alphas: np.ndarray,
                  starts: Dict[int, torch.Tensor], splits: int) -> None:
    """One search per input quantizer; in a qkv-split Linear quantizer i is scored on chunk i's outputs."""
    for i, q in enumerate(qs):
        cands = _input_candidates(q, alphas, starts[id(q)])
        scores = []
        for apply in cands:
            apply()
            scores.append(_scores(module, chunks).reshape(splits, -1)[i if splits > 1 else 0].sum())
        cands[int(torch.stack(scores).argmax())]()


def run(ctx: PTQContext) -> nn.Module:
    opt = ctx.opts.ptq4vit
    model = ctx.quantized_copy()
    ctx.init_bounds(model, "minmax")
    starts: Dict[int, torch.Tensor] = {}
    for _, m in quant_modules(model):  # the symmetric grids every search starts from
        for q in m.quantizers():
            starts[id(q)] = q.steps[1].clone() if isinstance(q, TwinUniformQuantizer) else start_step(q)
            if not isinstance(q, TwinUniformQuantizer):
                set_symmetric(q, starts[id(q)])
    lr, hr = ctx.calib.random_pairs(opt.num_patches, opt.patch_size, np.random.default_rng(ctx.opts.calib.seed + 3))
    names = [n for n, _ in quant_modules(model)]
    data = layer_data(ctx.fp_model, names, lr.to(ctx.device), hr.to(ctx.device), ctx.opts.calib.chunk_size,
                      ctx.input_range)
    alphas = opt.alpha_min + np.arange(opt.candidates) * (opt.alpha_max - opt.alpha_min) / opt.candidates
    for name in tqdm(names, desc="PTQ4ViT search"):
        module = model.get_submodule(name)
        for _ in range(opt.rounds):  # weights, then inputs (A, then B of a product)
            if isinstance(module, QuantMatMul):
                qs = [module.quant_a] + ([] if module.quant_b is None else [module.quant_b])
                for q in qs:
                    search_inputs(module, data[name], [q], alphas, starts, 1)
                continue
            if len(module.weight_quantizers):
                search_weights(module, data[name], alphas, starts)
            if len(module.input_quantizers):
                search_inputs(module, data[name], list(module.input_quantizers), alphas, starts,
                              getattr(module, "splits", 1))
    return model
