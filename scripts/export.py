#!/usr/bin/env python3
"""Export a quantized checkpoint for deployment.

    python scripts/export.py -opt options/train/EMT_x4_2dquant.yml [--set ...] [--format packed] [--out FILE]
    python scripts/export.py --checkpoint experiments/<name>/models/net_q_latest.pth --format packed

``onnx``: QuantizeLinear/DequantizeLinear graph for ONNX Runtime's integer kernels (``condiquant/deploy/
onnx_export.py``; zero points aligned to the integer grid first, ``--tile`` for window-attention archs); prints
the op types ONNX Runtime executes after its optimisations. Score it with test.py:
``network_g: {type: onnx, path: FILE}``.

``packed``: quantized weights as bit-packed b-bit integer codes plus their (l, u) per tensor or channel, the rest
FP32 (``condiquant/deploy/packed.py``); ``test.py`` scores the file like any checkpoint
(``path.pretrain_network_g: ....cqpack``) with outputs bit-identical to the fake-quant checkpoint. Prints the file
size beside its theoretical size, 32 (P - Q) + b Q bits + the scales.
"""
from condiquant.cli import main_export

if __name__ == "__main__":
    raise SystemExit(main_export())
