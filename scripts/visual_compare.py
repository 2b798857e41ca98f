#!/usr/bin/env python3
"""Visual comparison figure (condiquant/figures.py): HR / bicubic / networks, cropped.

    python scripts/visual_compare.py --image HR.png --scale 4 --box X Y W H --entry LABEL=FILE ... --out FIG.png
"""
from condiquant.cli import main_compare

if __name__ == "__main__":
    raise SystemExit(main_compare())
