#!/usr/bin/env python3
"""Export a quantized checkpoint for deployment (packed low-bit file or ONNX Q/DQ graph); options and formats:
``condiquant/deploy/export.py``.

    python scripts/export.py --checkpoint experiments/<name>/models/net_q_latest.pth --format packed|onnx
"""
from condiquant.cli import main_export

if __name__ == "__main__":
    raise SystemExit(main_export())
