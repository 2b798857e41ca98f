"""CondiQuant weight conditioning: exact proxes, convergence properties, Gram collection, train -> test."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize
from conftest import NET, assert_quantized, train_options, write_yaml

from condiquant.archs import build_network
from condiquant.archs.emt_arch import ShiftConv1x1
from condiquant.cli import main_test, main_train
from condiquant.config import ConfigError
from condiquant.options import ConditioningOptions, QuantOptions
from condiquant.quant.checkpoint import build_quantized
from condiquant.quant.presets import resolve_placement
from condiquant.transforms import conditioning
from condiquant.transforms.conditioning import (collect_grams, condition_model, condition_weight,
                                                conditioning_layers, prox_kappa, prox_shrink, relative_change)

f64 = torch.float64


def _matrix(out: int, inp: int, kappa: float, seed: int) -> torch.Tensor:
    """Random matrix with log-spaced singular values from 1 down to 1/kappa."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    u = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=f64))[0]
    v = torch.linalg.qr(torch.randn(inp, k, generator=g, dtype=f64))[0]
    return (u * torch.logspace(0, -math.log10(kappa), k, dtype=f64)) @ v.T


def _spread(w: torch.Tensor) -> torch.Tensor:
    s = torch.linalg.svdvals(w)
    return 0.5 * ((s - s.mean()) ** 2).sum()


@pytest.mark.parametrize("shape,t", [((5, 8), 0.3), ((8, 5), 2.0), ((6, 6), 1.0)])
def test_prox_shrink_is_the_exact_minimiser(shape, t):
    v = _matrix(*shape, kappa=50.0, seed=1)
    z = prox_shrink(v, t)

    def objective(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((w - v) ** 2).sum() + t * _spread(w)

    # Brute force: L-BFGS over an unconstrained W, from a perturbed start.
    w = (v + 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=f64)).requires_grad_()
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(w)
        loss.backward()
        return loss

    opt.step(closure)
    assert float(objective(z)) <= float(objective(w.detach())) + 1e-12
    torch.testing.assert_close(z, w.detach(), atol=1e-6, rtol=0)
    s_v, s_z = torch.linalg.svdvals(v), torch.linalg.svdvals(z)
    torch.testing.assert_close(s_z.mean(), s_v.mean())  # the mean singular value is kept


@pytest.mark.parametrize("shape,kappa_max", [((6, 9), 10.0), ((9, 6), 3.0), ((5, 5), 30.0)])
def test_prox_kappa_is_the_euclidean_projection(shape, kappa_max):
    v = _matrix(*shape, kappa=1e3, seed=3)
    p = prox_kappa(v, kappa_max)
    s_v = torch.linalg.svdvals(v).numpy()
    # Brute force over the singular values: min ||s - s_v||^2 s.t. s_i <= kappa_max * s_j for all i, j.
    n = len(s_v)
    cons = [{"type": "ineq", "fun": lambda s, i=i, j=j: kappa_max * s[j] - s[i]} for i in range(n) for j in range(n)]
    best = minimize(lambda s: ((s - s_v) ** 2).sum(), s_v.clip(s_v.max() / kappa_max), method="SLSQP",
                    constraints=cons, bounds=[(0, None)] * n, options={"ftol": 1e-15, "maxiter": 1000})
    s_p = torch.linalg.svdvals(p).numpy()
    np.testing.assert_allclose(s_p, np.sort(best.x)[::-1], atol=1e-6)
    assert s_p.max() / s_p.min() <= kappa_max * (1 + 1e-9)
    # Same singular vectors: P = U diag(s_p) V^T.
    u, _, vh = torch.linalg.svd(v, full_matrices=False)
    torch.testing.assert_close(p, (u * torch.from_numpy(s_p)) @ vh)
    # Nearer than the feasible clip into [s_max / kappa_max, s_max].
    clipped = (u * torch.from_numpy(s_v.clip(s_v.max() / kappa_max))) @ vh
    assert (p - v).norm() <= (clipped - v).norm() + 1e-12
    torch.testing.assert_close(prox_kappa(p, kappa_max), p)  # feasible points stay


def _rank_deficient_gram(rows: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, rank, generator=g, dtype=f64) @ torch.randn(rank, dim, generator=g, dtype=f64)
    return x.T @ x


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_shrink_objective_decreases_monotonically(lam):
    w0 = _matrix(12, 20, kappa=300.0, seed=4)
    x = torch.randn(100, 20, generator=torch.Generator().manual_seed(5), dtype=f64)
    _, info = condition_weight(w0, x.T @ x, "shrink", lam, 0.0, 50)
    obj = np.array(info["objective"])
    assert len(obj) == 51 and np.all(np.diff(obj) <= 1e-12 * obj[0])
    assert info["kappa_after"] < info["kappa_before"]


def test_shrink_at_lambda_zero_is_the_identity():
    w0 = _matrix(12, 20, kappa=300.0, seed=4)
    w, info = condition_weight(w0, _rank_deficient_gram(100, 20, 20, 6), "shrink", 0.0, 0.0, 20)
    torch.testing.assert_close(w, w0)
    assert max(info["data"]) <= 1e-20


def test_kappa_bound_reaches_kappa_max():
    w0 = _matrix(16, 24, kappa=1e3, seed=7)
    w, info = condition_weight(w0, _rank_deficient_gram(300, 24, 24, 8), "kappa_bound", 1.0, 20.0, 30)
    assert info["kappa_before"] >= 999 and info["kappa_after"] <= 20.0 + 1e-6
    s = torch.linalg.svdvals(w)
    assert float(s.max() / s.min()) <= 20.0 + 1e-6


@pytest.mark.parametrize("regularizer,iters", [("kappa_bound", 300), ("shrink", 2000)])
def test_rank_deficient_input_keeps_the_output(regularizer, iters):
    """X (200 x 32) of rank 8: W can change in null(X), so kappa drops while X W^T stays."""
    w0 = _matrix(16, 32, kappa=3e3, seed=9)
    gram = _rank_deficient_gram(200, 32, 8, 10)
    w, info = condition_weight(w0, gram, regularizer, 1.0, 30.0, iters)
    assert info["kappa_before"] >= 1000
    assert info["kappa_after"] < info["kappa_before"] / 10
    assert relative_change(w, w0, gram) <= 1e-4
    assert info["data"][-1] <= 1e-8 * float(((w0 @ gram) * w0).sum())


class _Net(nn.Module):
    """A strided dilated conv, an EMT shifted 1x1 conv and a Linear over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2)
        self.shift = ShiftConv1x1(5, 5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shift(self.conv(x))
        return self.fc(y.permute(0, 2, 3, 1))


def _patch_rows(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of X by explicit loops over output positions: channel-major k x k patches, as weight.reshape(out, -1)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = [xp[n, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw].reshape(-1)
            for n in range(x.shape[0]) for i in range(out_h) for j in range(out_w)]
    return torch.stack(rows).double()


@pytest.mark.parametrize("block", [1 << 22, 50])  # one Gram update per batch, or many small ones
def test_collect_grams_matches_explicit_unfolding(block, monkeypatch):
    monkeypatch.setattr(conditioning, "_BLOCK_ELEMS", block)
    torch.manual_seed(0)
    net = _Net()
    batches = [torch.rand(2, 3, 9, 11), torch.rand(1, 3, 9, 11)]
    grams = collect_grams(net, {"conv": net.conv, "shift": net.shift, "fc": net.fc}, batches, 2.0)
    x = torch.cat(batches) * 2.0
    with torch.no_grad():
        feat = net.conv(x)
        shifted = net.shift.transform_input(feat)  # the shift happens before the weight: X is what the weight sees
        hidden = net.shift(feat).permute(0, 2, 3, 1).reshape(-1, 5)
    expected = {"conv": _patch_rows(x, net.conv), "shift": _patch_rows(shifted, net.shift), "fc": hidden.double()}
    for name, rows in expected.items():
        assert grams[name].rows == rows.shape[0]
        gram = rows.T @ rows  # X from a batched float32 forward: agrees to float32 rounding
        torch.testing.assert_close(grams[name].xtx, gram, rtol=0, atol=1e-6 * float(gram.abs().max()))


def _imdn_quant() -> QuantOptions:
    quant = QuantOptions(4, 4)
    return replace(quant, placement=resolve_placement("IMDN", quant.placement, "test"))


def test_layer_selection_and_equivalence_check(caplog):
    torch.manual_seed(0)
    model = build_network(NET).eval()
    opts = ConditioningOptions(layers=["IMDB1.**"], iters=5, lam=10.0)
    layers = conditioning_layers(model, _imdn_quant(), opts)
    assert layers and all(n.startswith("IMDB1.") and s == 1 for n, s in layers.items())
    assert conditioning_layers(model, _imdn_quant(), replace(opts, targets=["Linear"])) == {}
    batches, holdout = [torch.rand(2, 3, 12, 12)], [torch.rand(1, 3, 12, 12)]
    before = model.fea_conv.weight.clone()
    logger = logging.getLogger("test_conditioning")
    with caplog.at_level(logging.WARNING, logger="test_conditioning"):
        report = condition_model(model, replace(opts, tolerance=0.0), batches, holdout, layers, 1.0, logger)
    assert report.violations() and "held-out output" in caplog.text
    assert torch.equal(model.fea_conv.weight, before)  # not a selected layer
    # The contrast-attention 1x1s of nf=16 are 1 x 16 and 16 x 1 matrices: kappa = 1 already.
    assert all(r.kappa_after < r.kappa_before or r.shape[0] == 1 or r.shape[1] == 1 for r in report.layers)
    strict = replace(opts, tolerance=0.0, on_violation="error")
    with pytest.raises(ConfigError, match=r"conditioning.tolerance: layer IMDB1\.\S+ changes"):
        condition_model(build_network(NET).eval(), strict, batches, holdout, layers, 1.0, logger)


def test_split_qkv_chunks_are_conditioned_separately():
    """SwinIR's qkv has one weight quantizer per q/k/v chunk: each chunk is its own matrix, on the same X."""
    net = {"type": "SwinIR", "upscale": 2, "img_size": 8, "window_size": 4, "img_range": 1.0, "depths": [1],
           "embed_dim": 12, "num_heads": [2], "mlp_ratio": 2, "upsampler": "pixelshuffledirect",
           "resi_connection": "1conv"}
    torch.manual_seed(0)
    model = build_network(net).eval()
    quant = QuantOptions(4, 4)
    quant = replace(quant, placement=resolve_placement("SwinIR", quant.placement, "test"))
    opts = ConditioningOptions(layers=["**.attn.qkv", "**.mlp.fc1"], iters=5, lam=0.1)
    layers = conditioning_layers(model, quant, opts)
    assert sorted(layers.values()) == [1, 3] and all(n.endswith(("attn.qkv", "mlp.fc1")) for n in layers)
    qkv = next(n for n, s in layers.items() if s == 3)
    w0 = model.get_submodule(qkv).weight.detach().clone()
    report = condition_model(model, opts, [torch.rand(2, 3, 8, 8)], [torch.rand(1, 3, 8, 8)], layers, 1.0,
                             logging.getLogger("test_conditioning"))
    assert [r.name for r in report.layers][:3] == [f"{qkv}[{i}]" for i in range(3)]
    assert all(r.shape == (12, 12) for r in report.layers[:3])
    w = model.get_submodule(qkv).weight.detach()
    for i, r in enumerate(report.layers[:3]):  # each chunk's singular values were shrunk towards its own mean
        s0, s = torch.linalg.svdvals(w0[12 * i:12 * (i + 1)]), torch.linalg.svdvals(w[12 * i:12 * (i + 1)])
        assert float(s.max() / s.min()) == pytest.approx(r.kappa_after, rel=1e-4) and r.kappa_after < r.kappa_before
        assert float(s.std()) < float(s0.std())


def test_condiquant_train_then_test_and_resume(project):
    opts = train_options("condiquant")
    opts["conditioning"] = {"num_patches": 4, "patch_size": 12, "holdout_patches": 2, "iters": 10}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_condiquant"
    report = json.loads((exp / "conditioning.json").read_text())
    assert (exp / "conditioning_kappa.png").stat().st_size > 0
    names = {r["name"] for r in report["layers"]}
    assert "IMDB1.c1" in names and "fea_conv" not in names
    ckpt = exp / "models" / "net_q_latest.pth"
    params = torch.load(ckpt, weights_only=True)["params"]
    fp = torch.load(project / "fp.pth", weights_only=True)["params"]
    assert not torch.equal(params["IMDB1.c1.weight"], fp["IMDB1.c1.weight"])  # conditioned weights are saved
    torch.testing.assert_close(params["fea_conv.weight"], fp["fea_conv.weight"])
    torch.testing.assert_close(params["IMDB1.c1.bias"], fp["IMDB1.c1.bias"])
    model = build_quantized(ckpt, NET, "test")
    torch.testing.assert_close(model.IMDB1.c1.weight, params["IMDB1.c1.weight"])
    test_opts = {"name": "score_condiquant", "scale": 2, "network_g": NET, "path": {"pretrain_network_g": str(ckpt)},
                 "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test_opts)]) == 0
    scores = json.loads((project / "results" / "score_condiquant" / "metrics.json").read_text())
    assert 5 < scores["datasets"]["Bench"]["psnr"] < 60
    assert_quantized(project, ckpt)
    # Resume at iteration 2: conditioning is skipped and the state restores the conditioned weights.
    opts["path"]["resume_state"] = str(exp / "training_states" / "2.state")
    assert main_train(["-opt", write_yaml(project, "resume.yml", opts)]) == 0
    again = torch.load(ckpt, weights_only=True)["params"]
    for key in params:
        torch.testing.assert_close(again[key], params[key])
