#!/usr/bin/env python3
"""Reproduce a results table: ``python scripts/reproduce.py -opt options/tables/<table>.yml``.

Each (row, bits) cell is calibrated (train.py's pipeline) over the table's seeds and scored (test.py's); runs are
cached in results/<table>/cells/ under a key of their options, seed and threads plus the package code that made
them, so rerunning the command continues where it stopped and never reuses a stale run. Writes
results/<table>.md/.json.

``--check N``: re-run N random cached trained runs on today's code and compare their validation PSNR with the
cached one (tolerance: the cell's seed std, at least 0.02 dB); results/<table>_check.json. Runs of older code
that all agree (at least two) are bridged to today's code and reused by the next table run.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from condiquant.cli import run_cli  # noqa: E402
from condiquant.grid import check, run_table  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-opt", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--check", type=int, default=0, metavar="N", help="re-run N random cached runs and compare")
    parser.add_argument("--seed", type=int, default=None, help="which runs --check picks (default: random)")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/reproduce.py", *sys.argv[1:]])
    if args.check:
        raise SystemExit(run_cli(lambda: print(json.dumps(check(args.opt, args.set, args.check, command, args.seed),
                                                          indent=1))))
    raise SystemExit(run_cli(lambda: print(run_table(args.opt, args.set, command).read_text())))
