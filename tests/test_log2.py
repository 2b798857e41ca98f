"""RepQ-ViT's log√2 quantizer: equals a hand-written reference on its grid, has 2^b levels, attaches to post-softmax
inputs only when asked."""
from __future__ import annotations

import math

import pytest
import torch

from condiquant.archs import build_network
from condiquant.options import QuantOptions
from condiquant.quant.attach import attach_quantizers, named_quantizers
from condiquant.quant.log2 import Log2Quantizer, log2_quant
from condiquant.quant.presets import resolve_placement


def reference(x: float, s: float, bits: int) -> float:
    if x <= 0:
        return 0.0
    q = max(0, round(-2 * math.log2(x / s)))
    return 0.0 if q > 2 ** bits - 2 else s * 2 ** (-q / 2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log2_equals_reference_and_has_2b_levels(bits):
    x = torch.cat([torch.rand(5000, dtype=torch.float64) ** 4, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    out = log2_quant(x, torch.tensor(1.0, dtype=torch.float64), bits)
    expected = torch.tensor([reference(v, 1.0, bits) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    assert len(torch.unique(out)) <= 2 ** bits and 0.0 in out.tolist() and 1.0 in out.tolist()


def test_log2_goes_to_emt_post_softmax_maps_only():
    net = build_network({"type": "EMT", "upscale": 2, "dim": 20, "n_blocks": 1, "n_layers": 2, "num_heads": 2,
                         "window_list": [[4, 4], [4, 4]], "shift_list": [[2, 2], [2, 2]]})
    quant = QuantOptions(w_bit=4, a_bit=4, softmax_quantizer="log2")
    quant.placement = resolve_placement("EMT", quant.placement, "p")
    attach_quantizers(net, quant)
    logs = {n for n, q in named_quantizers(net) if isinstance(q, Log2Quantizer)}
    assert logs and all(".av_matmuls." in n and n.endswith(".quant_a") for n in logs)
