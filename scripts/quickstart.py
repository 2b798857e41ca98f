#!/usr/bin/env python3
"""The README's main job: quantize the shipped default, score FP and quantized side by side, draw a comparison.

    python scripts/quickstart.py [-opt options/quickstart.yml] [--set key.path=value ...]

Runs train.py's pipeline on the options (default: EMT x4 W4A4, 2DQuant at a short CPU schedule), scores the FP
model and the quantized checkpoint on Set5 and Set14 with test.py's protocol, writes
``results/<name>_compare.png`` (HR / bicubic / FP / quantized crops of Set5 butterfly) and prints where
everything is and what to run next.
"""
from condiquant.cli import main_quickstart

if __name__ == "__main__":
    raise SystemExit(main_quickstart())
