"""Quantizer, observers and attachment: exact values, gradients, and 2DQuant's placement on SwinIR-light."""
from __future__ import annotations

import pytest
import torch

from condiquant.archs import build_network
from condiquant.options import QuantOptions
from condiquant.quant.attach import attach_quantizers, named_quantizers
from condiquant.quant.observers import DOBIObserver, MinMaxObserver, PercentileObserver
from condiquant.quant.presets import resolve_placement
from condiquant.quant.quantizer import SymmetricQuantizer, UniformQuantizer, fake_quant, fake_quant_reference

SWINIR_LIGHT_X4 = {"type": "SwinIR", "upscale": 4, "img_size": 64, "window_size": 8, "img_range": 1.0,
                   "depths": [6, 6, 6, 6], "embed_dim": 60, "num_heads": [6, 6, 6, 6], "mlp_ratio": 2,
                   "upsampler": "pixelshuffledirect", "resi_connection": "1conv"}


def hand_quant(v: float, lo: float, hi: float, bits: int) -> float:
    """Eq. 1 for one scalar, in plain Python."""
    levels = 2 ** bits - 1
    s = (hi - lo) / levels
    c = min(max(v, lo), hi)
    return round((c - lo) / s) * s + lo


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quant_equals_hand_written_reference(bits):
    x = torch.linspace(-3.3, 2.9, 301, dtype=torch.float64)
    lo, hi = torch.tensor(-1.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    ours = fake_quant(x, lo, hi, bits)
    expected = torch.tensor([hand_quant(v, -1.7, 1.3, bits) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert len(torch.unique(ours)) <= 2 ** bits
    if bits <= 4:  # the 301 samples cover every level of a short grid
        assert len(torch.unique(ours)) == 2 ** bits


@pytest.mark.parametrize("per_channel", [False, True])
def test_in_place_forward_is_bit_identical_to_the_op_chain(per_channel):
    """The forward runs its ops in place for speed; the values must be those of the plain op chain, bit for bit
    (cached table cells rely on it)."""
    torch.manual_seed(0)
    x = torch.randn(3, 8, 5, 7) * 2
    shape = (1, 8, 1, 1) if per_channel else ()
    lo, hi = -torch.rand(shape) - 0.2, torch.rand(shape) + 0.3
    width = torch.clamp(hi - lo, min=1e-8)
    scale = width / 15
    chain = torch.round((torch.minimum(torch.maximum(x, lo), lo + width) - lo) / scale) * scale + lo
    assert torch.equal(fake_quant(x, lo, hi, 4), chain)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_torch_fake_quantize_when_lower_bound_is_on_the_grid(bits):
    levels = 2 ** bits - 1
    scale, zero_point = 0.037, 3  # lower = -zero_point * scale lies on torch's integer grid
    lo, hi = -zero_point * scale, (levels - zero_point) * scale
    x = torch.randn(4096) * 0.3
    ours = fake_quant(x, torch.tensor(lo), torch.tensor(hi), bits)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, levels)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_bound_gradients_match_finite_differences_and_eq2():
    torch.manual_seed(0)
    x = torch.randn(2000, dtype=torch.float64) * 1.5
    g = torch.randn(2000, dtype=torch.float64)
    lo = torch.tensor(-1.1, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    (fake_quant(x, lo, hi, 3) * g).sum().backward()
    # Eq. 2: d v_q / d u = H(v - u) + v_r / (2^N - 1) - (v_c - l) / (u - l)
    with torch.no_grad():
        vc = x.clamp(-1.1, 0.9)
        vr = torch.round((vc + 1.1) / (2.0 / 7))
        du = (x > 0.9).double() + vr / 7 - (vc + 1.1) / 2.0
        dl = (x < -1.1).double() - vr / 7 + (vc + 1.1) / 2.0
    torch.testing.assert_close(hi.grad, (g * du).sum())
    torch.testing.assert_close(lo.grad, (g * dl).sum())
    # Finite differences of the straight-through surrogate: round() frozen at the base point, identity slope.
    def surrogate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scale = (b - a) / 7
        z = (x.clamp(a.item(), b.item()) - a) / scale
        z0 = ((x.clamp(-1.1, 0.9) + 1.1) / (2.0 / 7)).detach()
        return ((torch.round(z0) + z - z0) * scale + a) @ g

    eps = 1e-6
    with torch.no_grad():
        for bound, grad in ((lo, lo.grad), (hi, hi.grad)):
            shift = torch.zeros(2, dtype=torch.float64)
            shift[0 if bound is lo else 1] = eps
            fd = (surrogate(lo + shift[0], hi + shift[1]) - surrogate(lo - shift[0], hi - shift[1])) / (2 * eps)
            torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-5)


def test_custom_backward_equals_autograd_reference_per_channel():
    torch.manual_seed(1)
    x1 = (torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    lo = (torch.rand(6, 1, 1, 1, dtype=torch.float64) - 1.5).requires_grad_()
    hi = (torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    g = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    (fake_quant(x1, lo, hi, 2) * g).sum().backward()
    grads = x1.grad.clone(), lo.grad.clone(), hi.grad.clone()
    lo.grad = hi.grad = None
    (fake_quant_reference(x2, lo, hi, 2) * g).sum().backward()
    for a, b in zip(grads, (x2.grad, lo.grad, hi.grad)):
        torch.testing.assert_close(a, b)


def test_quantizer_states_and_unsupported_bits():
    q = UniformQuantizer(4)
    x = torch.randn(100)
    assert torch.equal(q(x), x)  # not initialised: identity
    q.set_bounds(torch.tensor(-1.0), torch.tensor(1.0))
    assert len(torch.unique(q(x))) <= 16
    q.enabled = False
    assert torch.equal(q(x), x)
    with pytest.raises(ValueError, match="unsupported bit-width 1"):
        UniformQuantizer(1)


def test_dobi_beats_minmax_on_skewed_data():
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((50_000,)) - 0.5  # long right tail
    errors = {}
    for name, obs in {"minmax": MinMaxObserver(), "dobi": DOBIObserver(), "dobi_1dir": DOBIObserver(one_direction=True),
                      "percentile": PercentileObserver(99.9)}.items():
        obs.observe(x)
        lo, hi = obs.bounds(3)
        errors[name] = (x - fake_quant(x, lo, hi, 3)).norm().item()
    assert errors["dobi"] < errors["minmax"] * 0.9
    assert errors["dobi_1dir"] < errors["minmax"] * 0.9


def test_per_channel_observer_gives_one_range_per_output_channel():
    w = torch.randn(5, 3, 3, 3) * torch.arange(1, 6).view(5, 1, 1, 1)
    obs = MinMaxObserver(channel_axis=0)
    obs.observe(w)
    lo, hi = obs.bounds(4)
    torch.testing.assert_close(hi, w.flatten(1).max(1).values)
    torch.testing.assert_close(lo, w.flatten(1).min(1).values)


def test_swinir_light_gets_exactly_2dquants_384_quantizers():
    model = build_network(SWINIR_LIGHT_X4)
    quant = QuantOptions(w_bit=2, a_bit=2)
    quant.placement = resolve_placement("SwinIR", quant.placement, "quant.placement")
    replaced = attach_quantizers(model, quant)
    names = [n for n, _ in named_quantizers(model)]
    assert len(replaced) == 24 * 6 and len(names) == 384
    block = "layers.2.residual_group.blocks.3."
    expected = ([f"{block}attn.qkv.weight_quantizers.{i}" for i in range(3)]
                + [f"{block}attn.qkv.input_quantizers.{i}" for i in range(3)]
                + [f"{block}attn.qk_matmul.quant_{s}" for s in "ab"]
                + [f"{block}attn.av_matmul.quant_{s}" for s in "ab"]
                + [f"{block}{m}.{k}_quantizers.0" for m in ("attn.proj", "mlp.fc1", "mlp.fc2")
                   for k in ("weight", "input")])
    assert sorted(n for n in names if n.startswith(block)) == sorted(expected)
    # Convolutions, LayerNorm and the upsampler stay full precision.
    assert not any(n.startswith(("conv_first", "conv_after_body", "upsample", "layers.0.conv")) for n in names)
    # Uninitialised quantizers are the identity: the model still computes the FP function.
    x = torch.rand(1, 3, 16, 16)
    fp = build_network(SWINIR_LIGHT_X4)
    fp.load_state_dict({k: v for k, v in model.state_dict().items() if "quant" not in k}, strict=False)
    torch.testing.assert_close(model(x), fp.eval()(x))


@pytest.mark.parametrize("bits", [2, 3])
def test_one_direction_dobi_passes_the_midpoint_and_equals_brute_force(bits):
    torch.manual_seed(0)
    x = torch.distributions.Exponential(1.0).sample((2, 20_000))  # post-softmax-like: one long tail per row
    obs = DOBIObserver(steps=100, one_direction=True, channel_axis=0)
    obs.observe(x)
    lo, hi = obs.bounds(bits)
    mid = (x.min(1).values + x.max(1).values) / 2
    assert (hi < mid).all()  # Alg. 1's printed step could never get here
    assert torch.equal(lo, x.min(1).values)
    for row in range(2):  # the same grid searched by hand: l = min, u_i = max - i (max - min) / K
        v, mn, mx = x[row], x[row].min(), x[row].max()
        errs = [(v - fake_quant(v, mn, mx - i * (mx - mn) / 100, bits)).pow(2).sum().item() for i in range(100)]
        best = min(range(100), key=errs.__getitem__)
        assert hi[row].item() == pytest.approx((mx - best * (mx - mn) / 100).item(), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_quantizer_is_the_zero_point_0_grid_and_trains_only_its_upper_bound(bits):
    half = 2 ** (bits - 1)
    q = SymmetricQuantizer(bits, 3, channel_axis=0)
    assert [n for n, _ in q.named_parameters()] == ["upper"] and "lower" not in q.state_dict()
    q.set_bounds(torch.tensor([-2.0, -0.5, -1.0]), torch.tensor([1.0, 0.9, 2.0]))  # the smallest covering grids
    step = q.upper.detach() / (half - 1)
    assert (q.lower.detach() <= torch.tensor([-2.0, -0.5, -1.0])).all() and (q.upper >= torch.tensor([1.0, 0.9, 2.0])).all()
    assert torch.isclose(q.lower.detach(), -half * step).all() and (q.upper > 0.9 * torch.tensor([1.0, 0.9, 2.0])).all()
    x = torch.randn(3, 500) * 1.5
    expected = torch.clamp(torch.round(x / step[:, None]), -half, half - 1) * step[:, None]  # codes, zero point 0
    out = q(x)
    assert (out - expected).abs().max() < 1e-5 * step.max()
    assert all(len(torch.unique(out[c])) <= 2 ** bits for c in range(3))
    (out * torch.randn_like(out)).sum().backward()
    assert q.upper.grad is not None and q.upper.grad.abs().sum() > 0
    q.set_bounds(q.lower.detach(), q.upper.detach())  # its own bounds: unchanged
    torch.testing.assert_close(q.upper.detach(), step * (half - 1), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_dobi_searches_symmetric_grids_and_beats_the_covering_one(bits):
    torch.manual_seed(0)
    x = torch.randn(2, 20_000) * torch.tensor([[1.0], [3.0]]) + torch.tensor([[0.3], [-1.0]])
    obs = DOBIObserver(steps=100, symmetric=True, channel_axis=0)
    obs.observe(x)
    lo, hi = obs.bounds(bits)
    half = 2 ** (bits - 1)
    torch.testing.assert_close(lo, -half / (half - 1) * hi)
    cover = torch.maximum(x.max(1).values, -x.min(1).values * (half - 1) / half)
    err = (x - fake_quant(x, lo[:, None], hi[:, None], bits)).pow(2).sum(1)
    err_cover = (x - fake_quant(x, -half / (half - 1) * cover[:, None], cover[:, None], bits)).pow(2).sum(1)
    assert (hi < cover).all() and (err < 0.7 * err_cover).all()


def test_gram_matmul_puts_both_operands_on_one_grid():
    from condiquant.archs.ops import MatMul
    from condiquant.quant.modules import QuantMatMul

    q = QuantMatMul(MatMul(gram=True), 3)
    q.quant_a.set_bounds(torch.tensor(-1.0), torch.tensor(1.0))
    a = torch.randn(2, 5, 4)
    qa = fake_quant(a, torch.tensor(-1.0), torch.tensor(1.0), 3)
    torch.testing.assert_close(q(a, a.transpose(-2, -1)), qa @ qa.transpose(-2, -1))
    assert q.quant_b is None and len(list(q.quantizers())) == 1


def test_emt_q_qt_product_has_a_single_quantizer():
    model = build_network({"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
                           "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]})
    quant = QuantOptions(w_bit=4, a_bit=4)
    quant.placement = resolve_placement("EMT", quant.placement, "quant.placement")
    attach_quantizers(model, quant)
    names = [n for n, _ in named_quantizers(model)]
    assert any(".qk_matmuls." in n for n in names)
    assert not any(".qk_matmuls." in n and n.endswith("quant_b") for n in names)
    assert any(".av_matmuls." in n and n.endswith("quant_b") for n in names)


@pytest.mark.parametrize("kind", ["uniform", "log2", "twin_softmax", "twin_activation"])
def test_scoring_path_equals_the_training_path_bit_for_bit(kind):
    """Without gradients the quantizers skip the straight-through terms and work in place; the values must not
    change (scoring and training see the same grid)."""
    from condiquant.quant.log2 import Log2Quantizer
    from condiquant.quant.twin import TwinUniformQuantizer

    torch.manual_seed(1)
    x = torch.randn(2, 6, 9, 9)
    if kind in ("log2", "twin_softmax"):  # post-softmax maps
        x = torch.softmax(x, dim=-1)
    q = {"uniform": lambda: UniformQuantizer(3), "log2": lambda: Log2Quantizer(3),
         "twin_softmax": lambda: TwinUniformQuantizer(3, "softmax"),
         "twin_activation": lambda: TwinUniformQuantizer(3, "activation")}[kind]()
    q.set_bounds(x.min(), x.max())
    trained = q(x.clone().requires_grad_(True))
    trained.sum().backward()  # the training path still differentiates
    with torch.no_grad():
        scored = q(x)
    assert torch.equal(trained.detach(), scored) and not torch.equal(scored, x)
