#!/usr/bin/env python3
"""PTQ processing time of several rows of a table, measured in one run (one process, one after another).

    python scripts/bench_methods.py -opt options/tables/imdn_x4.yml --methods 2dquant condiquant oaq --bits 4

Each row is calibrated exactly as its table cell would be (``train.py``'s pipeline, experiment
``bench_<table>_<cell>``), without scoring. Reported: seconds of the method itself (from the experiment's
``summary.json``: conditioning, bound initialisation, finetuning; not loading), the ratio to the first row, and
the calibration-validation PSNR.
Writes ``results/bench_methods_<table>_W<b>A<b>.md``.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path


from condiquant.cli import option_parser, run_cli
from condiquant.grid import cell_train_options, load_table
from condiquant.ptq import run_train


def main(args: argparse.Namespace, command: str) -> None:
    table = load_table(args.opt, args.set)
    rows = []
    for method in args.methods:
        name = f"bench_{table.name}_{method}_W{args.bits}A{args.bits}"
        opts, source = cell_train_options(table, method, args.bits, name)
        run_train(opts, source, command)
        summary = json.loads((Path("experiments") / name / "summary.json").read_text())
        rows.append((method, opts.method, summary["seconds"], summary["val_psnr"]))
    base = rows[0][2]
    lines = [f"# PTQ time: {table.name} W{args.bits}A{args.bits}", "", f"`{command}` (one process, rows run one "
             "after another; seconds of the method itself, no scoring).", "",
             "| row | method | seconds | x first row | calibration-validation PSNR (dB) |", "|---|---|---|---|---|"]
    lines += [f"| {row} | {method} | {sec:.0f} | {sec / base:.2f} | {psnr:.3f} |" for row, method, sec, psnr in rows]
    out = Path("results") / f"bench_methods_{table.name}_W{args.bits}A{args.bits}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    parser = option_parser("scripts/bench_methods.py")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--bits", type=int, default=4)
    ns = parser.parse_args()
    cmd = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_methods.py", *sys.argv[1:]])
    raise SystemExit(run_cli(lambda: main(ns, cmd)))
