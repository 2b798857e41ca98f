#!/usr/bin/env python3
"""Reproduce a results table: ``python scripts/reproduce.py -opt options/tables/<table>.yml``.

Each (method, bits) cell is calibrated (train.py's pipeline) and scored (test.py's); finished cells are cached
in results/<table>/cells/, so rerunning the command continues where it stopped. Writes results/<table>.md/.json.
"""
import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from condiquant.cli import run_cli  # noqa: E402
from condiquant.grid import run_table  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("-opt", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/reproduce.py", *sys.argv[1:]])
    raise SystemExit(run_cli(lambda: print(run_table(args.opt, args.set, command).read_text())))
