#!/usr/bin/env python3
"""Super-resolve a folder of images with an exported ONNX model in ONNX Runtime (tiled when it was exported at a
fixed tile), without torch models or condiquant checkpoints.

    python scripts/infer_onnx.py --model experiments/<name>/models/net_q_latest.onnx --input DIR --output DIR \\
        [--threads N]

Writes ``<output>/<stem>.png`` for every image in ``--input``.
"""
from condiquant.cli import main_infer_onnx

if __name__ == "__main__":
    raise SystemExit(main_infer_onnx())
