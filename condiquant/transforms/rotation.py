"""Rotation (issue "Rotation"): orthogonal transforms that spread activation outliers over many channels before
quantization, exact in float and deployable: every quantized product still reduces over the rotated axis, and
nothing is rotated back between a quantizer and the product it feeds.

Two kinds of site, row-vector convention (a layer computes x W^T):

- **online**, the input of a quantized Linear/Conv2d: x W^T = (x R)(W R)^T for orthogonal R. The weight is rotated
  offline on its input-channel axis (a k x k convolution on every tap); the activation side x R is a fixed channel
  matmul inside the layer (``transform_input``, after any pre-transform such as EMT's shift), so the input
  quantizer sees x R. In IMDN, EMT and SwinIR every quantized input follows a nonlinearity, a concatenation, a
  residual sum or a normalisation shared by other consumers, so no R can be folded into the layer before it: the
  online transforms stay online (their cost is measured by ``scripts/bench_rotation.py``).
- **attention**, absorbed offline (no online cost): q and k share one R along the head dimension,
  (q R)(k R)^T = q k^T, R applied to the rows of their projection; v gets its own R_v the same way, and since
  softmax(.) (v R_v) = (softmax(.) v) R_v the output projection takes R_v on its input axis. SwinIR's window
  attention (qkv/proj Linear) and EMT's striped attention (shared q = k; its 1x1 projection's BatchNorm is folded
  into the conv first, leaving an identity BatchNorm, because a per-channel scale does not commute with R).

R is a randomised Hadamard matrix D H / sqrt(n) (random signs D) where an order-n Hadamard matrix is built here
(Sylvester 2^k, Paley I for p + 1 with p = 3 mod 4 prime, Paley II for 2(q + 1) with q = 1 mod 4 prime, and their
Kronecker products: 12, 48, 60, 120, 180, 240 ...), else a seeded Haar-random orthogonal matrix (head dimension
10 of EMT and SwinIR-light). Per site, R is kept only where it lowers the quantization error measured on
calibration crops (``rotate.select: error``): one-sided inputs (post-Swish, post-ReLU) often get worse, because
a rotation makes them two-sided. The error of an online site is the relative output error of the layer with
DOBI-fitted quantizers on input and weight, ||x W^T - Q(x R) Q(W R)^T|| / ||x W^T||; of an attention operand, its
relative quantization error ||y - Q(y R) R^T|| / ||y|| (the same with R = I for "before"). The quantizers of the
measurement are DOBI's, one-sided where bound initialisation will search one-sided (``placement.one_direction``:
post-GELU / post-Swish inputs), so a rotation is judged by the grid it will really get.

The pass runs in float64 on the FP network; the network's output on held-out crops is then checked against the
original (``check_exact``, 1e-6) before any quantizer exists. Order with the other passes: ``prox`` before or
after (singular values do not change under a right rotation), ``noise_aware`` after (it fits the rotated weights
to the rotated, quantized inputs).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from condiquant.options import QuantOptions, RotateOptions
from condiquant.quant.attach import select_modules
from condiquant.quant.modules import input_transform
from condiquant.quant.observers import dobi_search
from condiquant.quant.patterns import matches
from condiquant.quant.quantizer import fake_quant
from condiquant.transforms.equivalence import check_exact

# ---------------------------------------------------------------------------------------------------------------
# Orthogonal matrices


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(math.isqrt(p)) + 1))


def _jacobsthal(p: int) -> np.ndarray:
    """Q[i, j] = chi(j - i) with chi the quadratic character mod p (chi(0) = 0)."""
    squares = {(k * k) % p for k in range(1, p)}
    chi = np.array([0] + [1 if k in squares else -1 for k in range(1, p)])
    idx = (np.arange(p)[None, :] - np.arange(p)[:, None]) % p
    return chi[idx]


def _paley(n: int) -> Optional[np.ndarray]:
    """A Paley Hadamard matrix of order n, or None."""
    p = n - 1
    if _is_prime(p) and p % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]], Q skew
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(p)
        return s + np.eye(n, dtype=np.int64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
    return None


def hadamard(n: int) -> Optional[np.ndarray]:
    """An n x n matrix of +-1 with H H^T = n I (Sylvester, Paley or their Kronecker product), or None."""
    power = 1
    while n % power == 0:
        m = n // power
        core = np.ones((1, 1), dtype=np.int64) if m == 1 else _paley(m)
        if core is not None:
            h = core
            for _ in range(power.bit_length() - 1):
                h = np.kron([[1, 1], [1, -1]], h)
            assert (h @ h.T == n * np.eye(n)).all()
            return h
        power *= 2
    return None


def orthogonal(n: int, matrix: str, rng: np.random.Generator) -> Tuple[Tensor, str]:
    """(R, kind): a float64 orthogonal n x n matrix, randomised Hadamard where one of order n exists."""
    h = hadamard(n) if matrix == "hadamard" else None
    if h is not None:
        signs = rng.choice([-1.0, 1.0], size=n)
        return torch.from_numpy(signs[:, None] * h / math.sqrt(n)), "hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return torch.from_numpy(q * np.sign(np.diag(r))), "random"  # Haar: fix QR's sign ambiguity


# ---------------------------------------------------------------------------------------------------------------
# Online input rotation: a layer class that multiplies x R by a weight stored as W R


def rotate_channels(x: Tensor, r: Tensor, conv: bool) -> Tensor:
    """x R along the channel axis (last for a Linear's input, 1 for a convolution's)."""
    return F.conv2d(x, r.T[:, :, None, None]) if conv else x @ r


_ROTATED: Dict[type, type] = {}


def rotated_class(cls: type) -> type:
    """``cls`` with ``transform_input`` = its own pre-transform (if any), then x R with R the ``rotation`` buffer.
    The transform reads only buffers, so the quantized replacements (which keep them) apply it too."""
    if getattr(cls, "rotation_base", None) is not None:
        return cls
    if cls not in _ROTATED:
        base = getattr(cls, "transform_input", None)
        conv = issubclass(cls, nn.Conv2d)

        def transform_input(self, x: Tensor) -> Tensor:
            return rotate_channels(base(self, x) if base is not None else x, self.rotation, conv)

        def forward(self, x: Tensor) -> Tensor:
            x = transform_input(self, x)
            return self._conv_forward(x, self.weight, self.bias) if conv else F.linear(x, self.weight, self.bias)

        _ROTATED[cls] = type(f"Rotated{cls.__name__}", (cls,), {
            "transform_input": transform_input, "forward": forward, "rotation_base": cls, "__module__": __name__,
            "__doc__": f"{cls.__name__} whose input is rotated (x R) before its weight (stored as W R)."})
    return _ROTATED[cls]


def _channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


@torch.no_grad()
def rotate_input(module: nn.Module, r: Tensor) -> None:
    """Make ``module`` (Linear/Conv2d, groups 1) compute the same function on the rotated input x R: W <- W R on
    the input axis (in float64), and R composed into its ``rotation`` buffer."""
    w = module.weight.data.double()
    w = torch.einsum("oihw,ij->ojhw", w, r) if w.dim() == 4 else w @ r
    module.weight.data.copy_(w.to(module.weight.dtype))
    if getattr(module, "rotation", None) is not None:
        module.rotation.copy_((module.rotation.double() @ r).to(module.rotation.dtype))
        return
    module.__class__ = rotated_class(type(module))
    module.register_buffer("rotation", r.to(module.weight.dtype))


def restore_rotations(model: nn.Module, tensors: Mapping[str, Any]) -> int:
    """Before loading a state dict (or packed file) that holds ``<layer>.rotation`` entries into a freshly built
    network: give those layers their rotated class and a placeholder buffer of the stored shape. Returns how
    many layers it changed."""
    n = 0
    for key, value in tensors.items():
        if not key.endswith(".rotation"):
            continue
        module = model.get_submodule(key[: -len(".rotation")])
        if getattr(module, "rotation", None) is None:
            shape = tuple(value.shape) if hasattr(value, "shape") else tuple(value)
            module.__class__ = rotated_class(type(module))
            module.register_buffer("rotation", torch.zeros(shape, dtype=module.weight.dtype))
            n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# Attention sites: index blocks along which R acts, absorbed into the projections


@dataclass
class AttentionSite:
    name: str  # the attention module
    producer: nn.Module  # projection whose output rows hold q (and k) and v
    consumer: nn.Module  # output projection, whose input columns hold the heads of softmax(.) v
    qk_rows: List[List[int]]  # per head: the producer rows of q, then (if not shared) of k, each head_dim long
    v_rows: List[List[int]]  # per head: the producer rows of v
    out_cols: List[List[int]]  # per head: the consumer input columns of that head's output
    head_dim: int
    qk_operands: List[Tuple[nn.Module, str]]  # (MatMul, which input) carrying q / k^T (for the error measurement)
    v_operands: List[Tuple[nn.Module, str]]


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn o conv (inference statistics), bn <- identity, in float64."""
    with torch.no_grad():
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = conv.weight.double() * s[:, None, None, None]
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
        b = (b - bn.running_mean.double()) * s + bn.bias.double()
        conv.weight.copy_(w.to(conv.weight.dtype))
        conv.bias.copy_(b.to(conv.bias.dtype))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))  # (z - 0) / sqrt(1 + eps) * sqrt(1 + eps) = z
        bn.bias.zero_()


def attention_sites(model: nn.Module) -> List[AttentionSite]:
    """The attention modules of the archs this pass knows (SwinIR window attention, EMT striped attention)."""
    from condiquant.archs.emt_arch import StripedWindowAttention
    from condiquant.archs.swinir_arch import WindowAttention

    sites = []
    for name, m in model.named_modules():
        if isinstance(m, WindowAttention):
            hd, heads, c = m.head_dim, m.num_heads, m.head_dim * m.num_heads
            block = lambda off, h: list(range(off + h * hd, off + (h + 1) * hd))  # noqa: E731
            sites.append(AttentionSite(
                name, m.qkv, m.proj, [block(0, h) + block(c, h) for h in range(heads)],
                [block(2 * c, h) for h in range(heads)], [block(0, h) for h in range(heads)], hd,
                [(m.qk_matmul, "a"), (m.qk_matmul, "bT")], [(m.av_matmul, "b")]))
        elif isinstance(m, StripedWindowAttention):
            hd, heads, n_win = m.head_dim, m.num_heads, len(m.window_list)
            width = 2 * heads * hd  # one window's slice: (q/v, head, c)
            qk, v, out = [], [], []
            for i in range(n_win):
                for h in range(heads):
                    qk.append(list(range(i * width + h * hd, i * width + (h + 1) * hd)))
                    v.append(list(range(i * width + (heads + h) * hd, i * width + (heads + h + 1) * hd)))
                    out.append(list(range((i * heads + h) * hd, (i * heads + h + 1) * hd)))
            sites.append(AttentionSite(name, m.attn[0], m.proj[0], qk, v, out, hd,
                                       [(mm, "a") for mm in m.qk_matmuls], [(mm, "b") for mm in m.av_matmuls]))
    return sites


@torch.no_grad()
def rotate_attention(site: AttentionSite, model: nn.Module, r_qk: Optional[Tensor], r_v: Optional[Tensor]) -> None:
    """Absorb R_qk into q/k and R_v into v (producer rows: W <- R^T W per head block) and R_v into the output
    projection's input columns (W <- W R per head block)."""
    from condiquant.archs.emt_arch import StripedWindowAttention

    module = model.get_submodule(site.name)
    if isinstance(module, StripedWindowAttention):
        _fold_batchnorm(module.attn[0], module.attn[1])
    w = site.producer.weight.data
    rows = w.reshape(w.shape[0], -1).double()
    bias = site.producer.bias.data.double() if site.producer.bias is not None else None
    for blocks, r in ((site.qk_rows, r_qk), (site.v_rows, r_v)):
        if r is None:
            continue
        for block in blocks:
            for part in range(0, len(block), site.head_dim):  # q and k rows of one head: the same R
                idx = torch.tensor(block[part:part + site.head_dim])
                rows[idx] = r.T @ rows[idx]
                if bias is not None:
                    bias[idx] = r.T @ bias[idx]
    w.copy_(rows.reshape(w.shape).to(w.dtype))
    if bias is not None:
        site.producer.bias.data.copy_(bias.to(site.producer.bias.dtype))
    if r_v is not None:
        cw = site.consumer.weight.data
        cols = cw.reshape(cw.shape[0], cw.shape[1], -1).double()
        for block in site.out_cols:
            idx = torch.tensor(block)
            cols[:, idx] = torch.einsum("oik,ij->ojk", cols[:, idx], r_v)
        cw.copy_(cols.reshape(cw.shape).to(cw.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Per-site decision from the quantization error on calibration crops


def _dobi_fq(rows: Tensor, bits: int, steps: int, max_samples: int, gen: torch.Generator,
             one_direction: bool = False) -> Tensor:
    """``rows`` (C, N) fake-quantized with per-row DOBI bounds (searched on at most ``max_samples`` values)."""
    sample = rows
    if rows.shape[1] > max_samples:
        sample = rows[:, torch.randint(rows.shape[1], (max_samples,), generator=gen)]
    lo, hi = dobi_search(sample, rows.min(dim=1).values, rows.max(dim=1).values, bits, steps, one_direction)
    return fake_quant(rows, lo[:, None], hi[:, None], bits)


@dataclass
class SiteReport:
    name: str  # layer name (online) or "<attention>.qk" / "<attention>.v"
    kind: str  # online | qk | v
    dim: int
    matrix: str  # hadamard | random
    error_before: float  # relative error without rotation (see the module docstring)
    error_after: float  # with R
    rotated: bool


@dataclass
class RotationReport:
    options: RotateOptions
    sites: List[SiteReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    output_change: float = 0.0  # relative, float64, on the held-out crops
    seconds: float = 0.0


class _Measure:
    """Errors of every candidate site with and without its R, from hooks on one forward of the FP network."""

    def __init__(self, bits: Dict[str, Tuple[int, int]], per_channel: bool, steps: int, max_samples: int,
                 seed: int, one_direction: Sequence[str] = ()):
        self.bits, self.per_channel, self.steps, self.max_samples = bits, per_channel, steps, max_samples
        self.one_direction = set(one_direction)  # layers whose input DOBI searches one-sided (as bound init will)
        self.gen = torch.Generator().manual_seed(seed)
        self.errors: Dict[str, List[float]] = {}  # site -> [before, after] (summed squared error, reference)

    def _add(self, key: str, before: float, after: float, ref: float) -> None:
        e = self.errors.setdefault(key, [0.0, 0.0, 0.0])
        e[0], e[1], e[2] = e[0] + before, e[1] + after, e[2] + ref

    def online(self, name: str, r: Tensor, module: nn.Module, x: Tensor) -> None:
        fn = input_transform(module)
        x = (fn(module, x) if fn is not None else x).double()
        conv = isinstance(module, nn.Conv2d)
        w_bits, a_bits = self.bits[name]
        w = module.weight.double()
        args = (dict(stride=module.stride, padding=module.padding, dilation=module.dilation) if conv else {})
        apply = (lambda inp, wt: F.conv2d(inp, wt, None, **args)) if conv else (lambda inp, wt: inp @ wt.T)
        ref = apply(x, w)
        errs = []
        for rot in (None, r):
            xr = x if rot is None else rotate_channels(x, rot, conv)
            wr = w if rot is None else (torch.einsum("oihw,ij->ojhw", w, rot) if conv else w @ rot)
            xq = _dobi_fq(xr.reshape(1, -1), a_bits, self.steps, self.max_samples, self.gen,
                          name in self.one_direction).reshape(xr.shape)
            wrows = wr.reshape(wr.shape[0], -1) if self.per_channel else wr.reshape(1, -1)
            wq = _dobi_fq(wrows, w_bits, self.steps, self.max_samples, self.gen).reshape(wr.shape)
            errs.append(float((apply(xq, wq) - ref).pow(2).sum()))
        self._add(name, errs[0], errs[1], float(ref.pow(2).sum()))

    def operand(self, key: str, r: Tensor, y: Tensor, bits: int) -> None:
        y = y.double()
        errs = []
        for rot in (None, r):
            yr = y if rot is None else y @ rot
            errs.append(float((_dobi_fq(yr.reshape(1, -1), bits, self.steps, self.max_samples, self.gen)
                               .reshape(yr.shape) - yr).pow(2).sum()))
        self._add(key, errs[0], errs[1], float(y.pow(2).sum()))

    def relative(self, key: str) -> Tuple[float, float]:
        before, after, ref = self.errors[key]
        return math.sqrt(before / max(ref, 1e-300)), math.sqrt(after / max(ref, 1e-300))


def _operand(which: str, args: Tuple[Tensor, ...]) -> Tensor:
    """The q / k (as (..., N, head_dim)) or v operand of a MatMul call."""
    if which == "a":
        return args[0]
    if which == "bT":
        return args[1].transpose(-2, -1)
    return args[1]


@torch.no_grad()
def rotate_model(model: nn.Module, quant: QuantOptions, opts: RotateOptions, calib: Tensor, holdout: Sequence[Tensor],
                 input_range: float, logger: logging.Logger, diagnostics_dir: Optional[Path] = None,
                 source: Optional[nn.Module] = None) -> RotationReport:
    """Rotate the sites of FP ``model`` in place where that lowers their quantization error on ``calib`` (one batch
    of LR crops in 0..1), then check the output against ``source`` (default: ``model`` before the pass) on the
    held-out batches in float64."""
    tic = time.perf_counter()
    before = source if source is not None else copy.deepcopy(model)
    report = RotationReport(opts)
    rng = np.random.default_rng(opts.seed)
    place = quant.placement
    a_bits = lambda name: place.high_precision_bit if matches(name, place.high_precision) else quant.a_bit  # noqa
    w_bits = lambda name: place.high_precision_bit if matches(name, place.high_precision) else quant.w_bit  # noqa

    def decide(key: str, kind: str, dim: int, matrix: str, measure: _Measure) -> bool:
        err0, err1 = measure.relative(key)
        rotate = opts.select == "all" or err1 < err0 * (1.0 - opts.min_gain)
        report.sites.append(SiteReport(key, kind, dim, matrix, err0, err1, rotate))
        return rotate

    # 1. attention: measure q/k and v operands with and without R, absorb the chosen R offline
    sites = [s for s in attention_sites(model) if matches(s.name, opts.layers)] if opts.attention else []
    if sites:
        measure = _Measure({}, False, opts.dobi_steps, opts.max_samples, opts.seed)
        mats = {s.name: (orthogonal(s.head_dim, opts.matrix, rng), orthogonal(s.head_dim, opts.matrix, rng))
                for s in sites}
        handles = []
        for s in sites:
            (r_qk, _), (r_v, _) = mats[s.name]
            for key, operands, r in ((f"{s.name}.qk", s.qk_operands, r_qk), (f"{s.name}.v", s.v_operands, r_v)):
                for mm, which in operands:
                    hook = (lambda m, args, key=key, which=which, r=r:
                            measure.operand(key, r, _operand(which, args), quant.a_bit))
                    handles.append(mm.register_forward_pre_hook(hook))
        try:
            model(calib * input_range)
        finally:
            for h in handles:
                h.remove()
        for s in sites:
            (r_qk, kind_qk), (r_v, kind_v) = mats[s.name]
            use_qk = decide(f"{s.name}.qk", "qk", s.head_dim, kind_qk, measure)
            use_v = decide(f"{s.name}.v", "v", s.head_dim, kind_v, measure)
            if use_qk or use_v:
                rotate_attention(s, model, r_qk if use_qk else None, r_v if use_v else None)

    # 2. online: the inputs of the quantized Linear/Conv2d layers, measured on the network as it is now
    layers = {}
    if opts.online:
        for sel in select_modules(model, quant):
            if sel.kind == "MatMul" or not matches(sel.name, opts.layers):
                continue
            m = sel.module
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                report.skipped[sel.name] = f"grouped convolution (groups={m.groups})"
            elif _channels(m) < 2:
                report.skipped[sel.name] = "one input channel"
            else:
                layers[sel.name] = m
    if layers:
        measure = _Measure({n: (w_bits(n), a_bits(n)) for n in layers}, quant.w_granularity == "channel",
                           opts.dobi_steps, opts.max_samples, opts.seed,
                           [n for n in layers if matches(f"{n}.input_quantizers.0", place.one_direction)])
        mats = {n: orthogonal(_channels(m), opts.matrix, rng) for n, m in layers.items()}
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: measure.online(n, mats[n][0], mod, args[0]))
                   for n, m in layers.items()]
        try:
            model(calib * input_range)
        finally:
            for h in handles:
                h.remove()
        for n, m in layers.items():
            if decide(n, "online", _channels(m), mats[n][1], measure):
                rotate_input(m, mats[n][0])

    report.seconds = time.perf_counter() - tic
    chosen = [s for s in report.sites if s.rotated]
    logger.info("rotation: %d of %d sites rotated (%d online, %d attention operands); summed relative error "
                "%.4g without, %.4g with the chosen rotations; %.1f s", len(chosen), len(report.sites),
                sum(s.kind == "online" for s in chosen), sum(s.kind != "online" for s in chosen),
                sum(s.error_before for s in report.sites),
                sum(s.error_after if s.rotated else s.error_before for s in report.sites), report.seconds)
    for name, reason in report.skipped.items():
        logger.info("rotation: skipped %s: %s", name, reason)
    report.output_change = check_exact("rotation", before, model, holdout, input_range)
    if diagnostics_dir is not None:
        diagnostics_dir.mkdir(parents=True, exist_ok=True)
        (diagnostics_dir / "rotation.json").write_text(json.dumps(asdict(report), indent=1))
    return report
