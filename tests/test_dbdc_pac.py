"""PTQ4SR: density-based dual clipping, and PaC training activation bounds first, then weight bounds."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_quantized, train_options, write_yaml

from condiquant.cli import main_train
from condiquant.quant.observers import DensityObserver, density_clip


def test_density_clip_cuts_the_sparse_side_only():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(10_000, generator=g), torch.full((3,), 50.0)])  # 3 far outliers above
    lo, hi = density_clip(x, 1e-3)
    assert 0.0 <= lo < 0.03 and 0.97 < hi < 1.03  # the outliers' side is cut to the dense range, the other kept
    y = torch.cat([-torch.rand(10_000, generator=g) * 2, torch.full((4,), -90.0), torch.rand(10, generator=g)])
    lo, hi = density_clip(y, 2e-3)  # both sparse tails (far below, thin above) go; the dense range stays
    assert -2.1 < lo < -1.9 and -0.05 < hi < 0.05
    assert density_clip(torch.ones(5), 1e-4) == (1.0, 1.0)


def test_density_observer_averages_its_batches():
    obs = DensityObserver(1e-3)
    obs.observe(torch.linspace(0, 1, 5000))
    obs.observe(torch.linspace(0, 3, 5000))
    lo, hi = obs.bounds(4)
    assert abs(float(lo)) < 0.01 and abs(float(hi) - 2.0) < 0.01


def test_density_observer_per_channel_clips_each_channel_on_its_own():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, 4000, generator=g) * torch.tensor([[1.0], [5.0], [0.1]])
    w[1, :3] = 400.0  # an outlier in channel 1 only
    obs = DensityObserver(1e-3, channel_axis=0)
    obs.observe(w)
    lo, hi = obs.bounds(4)
    assert lo.shape == hi.shape == (3,)
    for c, top in enumerate((1.0, 5.0, 0.1)):
        assert abs(float(hi[c]) - top) < 0.05 * top and abs(float(lo[c])) < 0.05 * top  # bins: max / 2048 wide
        assert (float(lo[c]), float(hi[c])) == pytest.approx(density_clip(w[c], 1e-3))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_pac_trains_activation_then_weight_bounds(project, granularity):
    opts = train_options("dbdc_pac")
    opts["quant"]["w_granularity"] = granularity
    opts["pac"] = {"total_iter": 4, "batch_size": 2, "patch_size": 12, "print_freq": 2, "val_freq": 4,
                   "save_checkpoint_freq": 2}
    assert main_train(["-opt", write_yaml(project, "pac.yml", opts)]) == 0
    exp = project / "experiments" / "tiny_dbdc_pac" / "models"
    ck = {i: torch.load(exp / f"net_q_{i}.pth", weights_only=True)["params"] for i in (0, 2, 4)}
    bounds = [k for k in ck[0] if k.endswith((".lower", ".upper"))]
    weight = [k for k in bounds if ".weight_quantizers." in k]
    act = [k for k in bounds if k not in weight]

    def moved(a, b, keys):
        return any(not torch.equal(ck[a][k], ck[b][k]) for k in keys)
    assert moved(0, 2, act) and not moved(0, 2, weight)  # phase 1: activation bounds only
    assert moved(2, 4, weight) and not moved(2, 4, act)  # phase 2: weight bounds only
    assert_quantized(project, exp / "net_q_latest.pth")
