#!/usr/bin/env python3
"""Reproduce a results table: ``python scripts/reproduce.py -opt options/tables/<table>.yml``.

Each (row, bits) cell is calibrated (train.py's pipeline) over the table's seeds and scored (test.py's); runs are
cached in results/<table>/cells/ under a key of their options, seed and threads plus the package code that made
them, so rerunning the command continues where it stopped and never reuses a stale run. Writes
results/<table>.md/.json.

``--cached``: compute nothing; write the table from the cached runs and list the cells still missing.

``--check N``: re-run N random cached trained runs on today's code and compare their validation PSNR with the
cached one (tolerance: the cell's seed std, at least 0.02 dB); results/<table>_check.json. Runs of older code
that all agree (at least two) are bridged to today's code and reused by the next table run.
"""
from condiquant.cli import main_reproduce

if __name__ == "__main__":
    raise SystemExit(main_reproduce())
