"""ONNX export with QuantizeLinear/DequantizeLinear: tiny IMDN (dynamic H, W) and tiny EMT (window attention, fixed
tile, tiled outside the graph) run in ONNX Runtime, match the fake-quant model, and execute integer kernels."""
from __future__ import annotations

import pytest
import torch
from test_packed import EMT, IMDN, quantized

from condiquant.deploy.onnx_export import align_zero_points, export_onnx, to_qdq
from condiquant.deploy.onnx_runtime import OnnxSR, optimized_ops, x86_without_vnni

# ONNX Runtime's integer kernels on x86 AVX2 without VNNI add pairs of u8 x s8 products in int16, which saturates
# when both operands use all 8 bits. Measured by running ORT under valgrind (which hides AVX-512 from the program,
# so ORT takes its AVX2 kernels) on a tiny IMDN (scripts/check_onnx_avx2.py, results/onnx_avx2_check.md): W8A8 is
# 0.016 off the VNNI result, W8A7, W7A8 and W4A8 compute the same integers. So only W8A8 exactness tests fail there.
SATURATION = "ORT u8 x s8 int16 saturation at W8A8 on AVX2 without VNNI"
W8A8_INTEGER_EXACT = pytest.mark.xfail(x86_without_vnni(), strict=False, reason=SATURATION)

pytest.importorskip("onnxruntime", reason="the [deploy] extra (onnx, onnxruntime) is not installed")


@pytest.mark.parametrize("bits", [8, 4])
def test_imdn_export_is_dynamic_and_equals_the_aligned_fake_quant_model(tmp_path, bits):
    model, _, _ = quantized(IMDN, bits, "channel")
    with torch.no_grad():
        x = torch.rand(1, 3, 14, 19)
        before = model(x)
        align_zero_points(model)
        aligned = model(x)
    step = max((q.upper - q.lower).max().item() / (2 ** bits - 1) for q in model.modules() if hasattr(q, "n_bits"))
    assert (aligned - before).abs().max() <= 8 * step  # the shift is below half a step of every grid
    sr = OnnxSR(export_onnx(model, tmp_path / "imdn.onnx", scale=2))
    for shape in ((1, 3, 14, 19), (1, 3, 23, 17)):  # any size
        x = torch.rand(*shape)
        with torch.no_grad():
            diff = (sr(x) - model(x)).abs()
        # the same grids: only float rounding of values at half-steps can differ, by one step there
        assert diff.max() < 1 / 255 and (diff > 1e-5).float().mean() < 0.1


@W8A8_INTEGER_EXACT
def test_quantized_outputs_make_the_convolutions_integer(tmp_path):
    model, _, _ = quantized(IMDN, 8, "channel")
    align_zero_points(model)
    plain = optimized_ops(export_onnx(model, tmp_path / "plain.onnx", scale=2))
    batches = [torch.rand(4, 3, 16, 16)]
    fused = optimized_ops(export_onnx(model, tmp_path / "int.onnx", scale=2, output_batches=batches))
    n_quantized = sum(1 for m in model.modules() if type(m).__name__ == "QuantConv2d")
    assert fused.get("QLinearConv", 0) >= n_quantized > plain.get("QLinearConv", 0)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (OnnxSR(tmp_path / "int.onnx")(x) - model(x)).abs().max() < 4 / 255  # one more 8-bit rounding


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (8, True)], ids=["w4", "w8", "w8sym"])
def test_weight_zero_points_are_0_up_to_6_bits_and_on_symmetric_grids(tmp_path, bits, symmetric, monkeypatch,
                                                                      caplog):
    """ONNX Runtime's fast symmetric int8 kernels need weight zero point 0: b-bit codes c are stored as c - z (z the
    zero point) up to 6 bits, so |code| <= 63 and its AVX2 kernels (pairs of u8 x s8 products added in int16) cannot
    saturate; at 8 bits asymmetric grids are centred (c - 128, zero point z - 128), symmetric ones have z = 0. Only
    a W8A8 model warns on an x86 CPU without VNNI."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from condiquant.deploy.onnx_runtime import session

    model, _, _ = quantized(IMDN, bits, "channel", symmetric=symmetric)
    align_zero_points(model)
    path = export_onnx(model, tmp_path / "m.onnx", scale=2, output_batches=[torch.rand(4, 3, 16, 16)])
    session(path, optimized=tmp_path / "opt.onnx")  # ONNX Runtime folds Q(float weight) into int8 codes
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "QLinearConv"]
    assert len(convs) >= sum(1 for m in model.modules() if type(m).__name__ == "QuantConv2d")
    zeros = np.concatenate([init[n.input[5]].reshape(-1) for n in convs])
    codes = [init[n.input[3]] for n in convs]
    assert (not zeros.any()) == (bits <= 6 or symmetric)
    assert max(int(np.abs(c).max()) for c in codes) <= (2 ** bits - 1 if bits <= 6 else 128)
    assert max(int(np.abs(c).max()) for c in codes) > 2 ** (bits - 2)  # the grid is used, not squeezed
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        diff = (OnnxSR(path)(x) - model(x)).abs()
    monkeypatch.setattr("condiquant.deploy.onnx_runtime.x86_without_vnni", lambda: True)
    with caplog.at_level("WARNING", logger="condiquant"):
        OnnxSR(path)
    assert ("saturate" in caplog.text) == (bits == 8)
    # one more 8-bit rounding per layer output (at A4 it moves the next 4-bit roundings too); checked last, so that
    # on a CPU without VNNI everything above is still asserted before the saturating W8A8 kernels excuse the rest
    if bits == 8 and not (diff.mean() < 0.5 / 255 and diff.max() < 4 / 255):
        if x86_without_vnni():
            pytest.xfail(SATURATION)
        pytest.fail(f"W8A8 ORT output off the fake-quant model: mean {diff.mean():.4f}, max {diff.max():.4f}")


def test_float_outputs_leave_the_costliest_layers_float_and_bring_the_model_closer(tmp_path):
    import json

    import onnx

    model, _, _ = quantized(IMDN, 8, "channel", symmetric=True)
    align_zero_points(model)
    batches = [torch.rand(4, 3, 16, 16)]
    x = torch.rand(1, 3, 24, 24)
    errors, ops = [], []
    for k in (0, 2):
        path = export_onnx(model, tmp_path / f"m{k}.onnx", scale=2, output_batches=batches, float_outputs=k)
        meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
        assert len(meta["float_outputs"]) == k
        ops.append(optimized_ops(path).get("QLinearConv", 0))
        with torch.no_grad():
            errors.append(float((OnnxSR(path)(x) - model(x)).pow(2).mean()))
    assert ops[1] == ops[0] - 2
    assert errors[1] < errors[0]


def test_emt_exports_at_a_fixed_tile_and_runs_integer_matmuls(tmp_path):
    model, _, _ = quantized(EMT, 8, "channel")
    align_zero_points(model)
    path = export_onnx(model, tmp_path / "emt.onnx", scale=2, tile=16)
    ops = optimized_ops(path)
    assert ops.get("MatMulIntegerToFloat", 0) + ops.get("QLinearMatMul", 0) > 0, ops
    sr = OnnxSR(path)
    x = torch.rand(1, 3, 16, 16)
    r = model.input_range
    with torch.no_grad():
        torch.testing.assert_close(sr(x), to_qdq(model)(x * r) / r, atol=1e-5, rtol=0)
        assert (sr(x) - model(x * r) / r).abs().max() < 0.02
    assert sr(torch.rand(1, 3, 21, 30)).shape == (1, 3, 42, 60)  # larger than a tile: tiled outside the graph


def test_dual_region_model_is_refused(tmp_path):
    from condiquant.archs import build_network
    from condiquant.config import ConfigError
    from condiquant.options import QuantOptions
    from condiquant.quant.attach import attach_quantizers
    from condiquant.quant.presets import resolve_placement

    model = build_network(IMDN)
    quant = QuantOptions(w_bit=4, a_bit=4, a_quantizer="dual_region")
    quant.placement = resolve_placement("IMDN", quant.placement, "p")
    attach_quantizers(model, quant)
    with pytest.raises(ConfigError, match="DualRegionQuantizer has no integer ONNX form"):
        to_qdq(model)


def test_export_script_and_test_py_score_the_onnx_model(project):
    import argparse
    import json

    from conftest import NET, train_options, write_yaml

    from condiquant.cli import main_test, main_train

    opts = train_options("dobi")
    opts["quant"] = {"w_bit": 8, "a_bit": 8}
    assert main_train(["-opt", write_yaml(project, "train.yml", opts)]) == 0
    from condiquant.deploy.export import main as export

    report = export(argparse.Namespace(opt="train.yml", set=[], checkpoint=None, out=None, format="onnx", tile=None,
                                       scale=0, quantize_outputs=False, float_outputs=0))
    scores = {}
    for name, net, ckpt in (("fq", NET, report["checkpoint"]), ("onnx", {"type": "onnx", "path": report["onnx"]},
                                                                  None)):
        test = {"name": name, "scale": 2, "network_g": net, "path": {"pretrain_network_g": ckpt},
                "datasets": {"t": {"name": "Bench", "dataroot_gt": "bench/HR"}}}
        assert main_test(["-opt", write_yaml(project, "test.yml", test)]) == 0
        scores[name] = json.loads((project / "results" / name / "metrics.json").read_text())["datasets"]["Bench"]
    assert abs(scores["onnx"]["psnr"] - scores["fq"]["psnr"]) < 0.05


def test_infer_onnx_writes_one_image_per_input(tmp_path):
    import argparse

    from condiquant.data.paired import read_image, write_image
    from condiquant.deploy.infer import main as infer

    model, _, _ = quantized(IMDN, 8, "tensor")
    path = export_onnx(align_zero_points(model), tmp_path / "m.onnx", scale=2)
    for i in range(2):
        write_image(tmp_path / "in" / f"a{i}.png", (torch.rand(10 + i, 12, 3) * 255).byte().numpy())
    infer(argparse.Namespace(model=str(path), input=str(tmp_path / "in"),
                                                      output=str(tmp_path / "out"), threads=1))
    assert [read_image(tmp_path / "out" / f"a{i}.png").shape for i in range(2)] == [(20, 24, 3), (22, 24, 3)]


@pytest.mark.parametrize("w_bits", [None, 4])
def test_bench_deploy_writes_every_acceptance_field(project, w_bits):
    import argparse
    import shutil

    from conftest import load_script, train_options, write_yaml

    for name in ("Set5", "Urban100"):
        shutil.copytree(project / "bench" / "HR", project / "datasets" / "benchmark" / name / "HR")
    write_yaml(project, "train.yml", train_options("dobi"))
    bench = load_script("bench_deploy")
    bench.SIZES = {"Set5-sized": (16, 16), "Urban100-sized": (20, 24)}
    report = bench.main(argparse.Namespace(opt="train.yml", set=[], bits=8, w_bits=w_bits, method="dobi", tile=None,
                                           repeats=1, threads=1, float_outputs=1, datasets=["Set5", "Urban100"]), "bench")
    import json
    saved = json.loads((project / "results" / f"bench_deploy_IMDN_x2_W{w_bits or 8}A8.json").read_text())
    assert {"model", "bits", "packed_bytes", "theoretical_bytes", "int8_speedup_vs_fp32_torch", "psnr_int8",
            "psnr_fakequant"} <= set(saved) and saved["bits"] == 8 and report["model"] == "IMDN_x2"
    assert abs(saved["psnr_int8"] - saved["psnr_fakequant"]) < 0.5
    assert saved["optimized_ops"].get("QLinearConv", 0) > 0


@W8A8_INTEGER_EXACT
def test_rotated_model_exports_with_integer_convolutions_and_float_rotations(tmp_path):
    """The online rotations are float 1x1 products in front of QuantizeLinear; the quantized convolutions stay
    integer (QLinearConv) and the export matches the fake-quant model."""
    import copy
    import logging

    from condiquant.archs import build_network
    from condiquant.options import RotateOptions
    from condiquant.quant.attach import attach_quantizers
    from condiquant.quant.calibrate import ObserverSpec, init_bounds
    from condiquant.transforms.rotation import rotate_model

    _, quant, x = quantized(IMDN, 8, "channel")
    torch.manual_seed(0)
    model = build_network(IMDN).eval()
    report = rotate_model(model, quant, RotateOptions(select="all", dobi_steps=5), x[:2], [x[2:]], 1.0,
                          logging.getLogger("test_onnx"))
    rotated = sum(s.rotated for s in report.sites)
    attach_quantizers(model, quant)
    init_bounds(model, [x], ObserverSpec("dobi", dobi_steps=20))
    align_zero_points(model)
    ops = optimized_ops(export_onnx(copy.deepcopy(model), tmp_path / "rot.onnx", scale=2, output_batches=[x]))
    n_quantized = sum(1 for m in model.modules() if type(m).__name__ == "QuantConv2d")
    assert rotated > 0 and ops.get("QLinearConv", 0) >= n_quantized
    y = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (OnnxSR(tmp_path / "rot.onnx")(y) - model(y)).abs().max() < 4 / 255
