#!/usr/bin/env python3
"""Integer ONNX Runtime on an AVX2 CPU without VNNI, checked on any x86 machine: the exported model runs once
natively and once under valgrind, whose CPU has no AVX-512, so ONNX Runtime takes its AVX2 kernels (u8 x s8 pairs
summed in int16, which can saturate). Tiny IMDN x2 (random weights, DOBI bounds, per-channel weights, 8-bit
quantized outputs so that the convolutions run as QLinearConv), one 16x16 LR input.

    python scripts/check_onnx_avx2.py [--bits 4x8 7x8 8x7 8x8]

Prints, per W x A, the largest |ONNX Runtime - fake-quant| natively and under valgrind and their difference; writes
``results/onnx_avx2_check.md`` naming this command. Needs valgrind (Debian's package) and about a minute per model.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_onnx(model: str, data: str, out: str) -> None:
    """Child side: only numpy and onnxruntime (torch under valgrind would take many minutes)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sr = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"lr": np.load(data)["x"]})
    np.save(out, sr[0])


def export(w_bit: int, a_bit: int, folder: Path) -> tuple:
    import numpy as np
    import torch

    from condiquant.archs import build_network
    from condiquant.deploy.onnx_export import align_zero_points, export_onnx
    from condiquant.options import QuantOptions
    from condiquant.quant.attach import attach_quantizers
    from condiquant.quant.calibrate import ObserverSpec, init_bounds
    from condiquant.quant.presets import resolve_placement

    torch.manual_seed(0)
    net = {"type": "IMDN", "upscale": 2, "nf": 16, "num_modules": 2}
    model = build_network(net).eval()
    quant = QuantOptions(w_bit=w_bit, a_bit=a_bit, w_granularity="channel")
    quant.placement = resolve_placement("IMDN", quant.placement, "quant.placement")
    attach_quantizers(model, quant)
    init_bounds(model, [torch.rand(4, 3, 16, 16)], ObserverSpec("dobi", dobi_steps=20))
    align_zero_points(model)
    path = export_onnx(model, folder / f"W{w_bit}A{a_bit}.onnx", scale=2, output_batches=[torch.rand(4, 3, 16, 16)])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    data = folder / f"W{w_bit}A{a_bit}.npz"
    np.savez(data, x=x.numpy(), ref=ref.numpy())
    return path, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", nargs="+", default=["4x8", "7x8", "8x7", "8x8"], help="WxA pairs")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_onnx(*args.child)
        return 0
    try:
        pairs = [tuple(int(b) for b in p.split("x")) for p in args.bits]
    except ValueError:
        print(f"--bits: expected pairs like 4x8, got {args.bits}", file=sys.stderr)
        return 2
    if subprocess.run(["valgrind", "--version"], capture_output=True).returncode:
        print("valgrind: not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w, a in pairs:
            model, data = export(w, a, Path(tmp))
            outs = []
            for prefix in ([], ["valgrind", "--tool=none", "-q"]):
                outs.append(Path(tmp) / f"out{len(outs)}.npy")
                subprocess.run([*prefix, sys.executable, __file__, "--child", str(model), str(data), str(outs[-1])],
                               check=True, capture_output=True)
            ref = np.load(data)["ref"]
            native, emulated = (np.load(o) for o in outs)
            rows.append((w, a, *(float(np.abs(v).max()) for v in (native - ref, emulated - ref, emulated - native))))
            print("W{}A{}: native {:.6f}, AVX2 (valgrind) {:.6f}, AVX2 - native {:.2e}".format(*rows[-1]))
    import onnxruntime

    cmd = "python scripts/check_onnx_avx2.py --bits " + " ".join(shlex.quote(b) for b in args.bits)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    lines = ["# Integer ONNX Runtime on AVX2 without VNNI (emulated by valgrind)", "",
             f"`{cmd}` — tiny IMDN x2, random weights, DOBI, quantized outputs (QLinearConv); ONNX Runtime "
             f"{onnxruntime.__version__}; host {cpu}. Errors are max |SR - fake-quant SR| (images in 0..1); the native "
             f"error is the 8-bit rounding of the layer outputs that the fake-quant model does not have. The last "
             f"column is what the AVX2 kernels change: float rounding (~1e-7) when they compute the same integers.",
             "", "| W | A | native | AVX2 kernels (valgrind) | AVX2 - native |", "|---|---|---|---|---|"]
    lines += [f"| {w} | {a} | {n:.6f} | {e:.6f} | {d:.2e} |" for w, a, n, e, d in rows]
    out = ROOT / "results" / "onnx_avx2_check.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
