"""A network defined outside the package: quantized and scored from YAML (``network_g.type: file.py:Class``) and
from the Python API, its ``@`` products rewritten into quantizable MatMul modules."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import write_yaml

import condiquant
from condiquant.archs import build_network
from condiquant.archs.ops import MatMul
from condiquant.cli import main_test, main_train
from condiquant.config import ConfigError
from condiquant.quant.attach import named_quantizers

USER_ARCH = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyAttnSR(nn.Module):
    """conv -> token self-attention with a bare '@' -> conv -> pixel shuffle."""

    def __init__(self, upscale=2, dim=8):
        super().__init__()
        self.head = nn.Conv2d(3, dim, 3, padding=1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.body = nn.Conv2d(dim, dim, 3, padding=1)
        self.tail = nn.Conv2d(dim, 3 * upscale ** 2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x):
        f = self.head(x)
        t = f.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        a = (q @ k.transpose(1, 2)).softmax(dim=-1)
        f = f + (a @ v).transpose(1, 2).reshape(f.shape)
        return self.shuffle(self.tail(F.relu(self.body(f))))
'''


@pytest.fixture
def user_arch(project):
    (project / "user_arch.py").write_text(USER_ARCH)
    net = {"type": "user_arch.py:TinyAttnSR", "upscale": 2}
    torch.manual_seed(0)
    torch.save({"params": build_network(net).state_dict()}, project / "user.pth")
    return net


def test_user_arch_from_yaml_is_quantized_and_scored(project, user_arch):
    model = build_network(user_arch)
    assert sum(isinstance(m, MatMul) for m in model.modules()) == 2  # both '@' products rewritten
    train = {"name": "user", "scale": 2, "method": "dobi", "network_g": user_arch,
             "path": {"pretrain_network_g": "user.pth"}, "quant": {"w_bit": 4, "a_bit": 4},
             "calib": {"roots": ["calib/A"], "num_patches": 4, "patch_size": 12, "chunk_size": 2,
                       "val_patch_size": 16}}
    assert main_train(["-opt", write_yaml(project, "train.yml", train)]) == 0
    ckpt = project / "experiments" / "user" / "models" / "net_q_latest.pth"
    test = {"name": "user_score", "scale": 2, "network_g": user_arch, "path": {"pretrain_network_g": str(ckpt)},
            "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
    assert main_test(["-opt", write_yaml(project, "test.yml", test)]) == 0
    report = json.loads((project / "results" / "user_score" / "metrics.json").read_text())
    assert 5 < report["datasets"]["Bench"]["psnr"] < 60
    from condiquant.quant.checkpoint import build_quantized

    qmodel = build_quantized(ckpt, user_arch, "test")
    quantizers = dict(named_quantizers(qmodel))
    # generic placement: head, qkv, body, tail (weight + input each) and both matmuls (two inputs each)
    assert len(quantizers) == 4 * 2 + 2 * 2 and all(bool(q.initialized) for q in quantizers.values())


def test_python_api_quantizes_and_evaluates_a_module(project, user_arch):
    fp = build_network(user_arch)  # any nn.Module would do; this one is already rewritten
    qmodel, report = condiquant.quantize(fp, condiquant.QuantConfig(w_bit=4, a_bit=4, method="2dquant",
                                                                    calib={"num_patches": 4, "patch_size": 12,
                                                                           "chunk_size": 2, "val_patch_size": 16},
                                                                    dqc={"total_iter": 2, "batch_size": 2,
                                                                         "patch_size": 12, "val_freq": 2,
                                                                         "save_checkpoint_freq": 2}),
                                         calib="calib/A", scale=2)
    assert report["method"] == "2dquant" and report["quantizers"] == 12
    assert {"val_psnr", "fp_val_psnr", "val_psnr_iter0", "seconds"} <= set(report)
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert (qmodel(x) - fp(x)).abs().max() > 1e-4
    scores = condiquant.evaluate(qmodel, {"Bench": "bench/HR"}, scale=2)
    assert 5 < scores["Bench"]["psnr"] < 60


def test_untraceable_model_gets_a_clear_message():
    class Branchy(nn.Module):
        def forward(self, x):
            return x @ x if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ConfigError, match="does not trace with torch.fx .* call condiquant.archs.ops.MatMul"):
        condiquant.rewrite_matmuls(Branchy())


def test_bad_external_arch_is_one_line(project):
    with pytest.raises(ConfigError, match=r"network_g.type: file not found: nope.py"):
        build_network({"type": "nope.py:Net"})
    with pytest.raises(ConfigError, match=r"network_g.type: 'json' has no nn.Module class 'loads'"):
        build_network({"type": "json:loads"})
