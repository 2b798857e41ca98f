#!/usr/bin/env python3
"""What keeping freed memory in glibc's heap (``condiquant.runtime.keep_freed_memory``) is worth, measured in one run:
the same forwards of a test options' model (FP, or the quantized checkpoint it names) in two child processes, one
with ``CONDIQUANT_MALLOC=default`` (glibc's defaults: blocks above 32 MiB mapped and unmapped each time) and one
with the package default; wall, user and system time, page faults, peak memory, and whether the outputs are
bit-identical.

    python scripts/bench_malloc.py -opt options/test/EMT_x4.yml [--set path.pretrain_network_g=<ckpt>]
        [--size 192 256] [--repeats 3]

Writes ``results/bench_malloc_<name>.json`` and its ``.md`` twin, naming this command. One thread per child.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from condiquant.cli import command_line, load_options, option_parser, run_cli
from condiquant.engine.state import atomic_write_text
from condiquant.options import TestOptions
from condiquant.runtime import configure
from condiquant.scoring import build_model


def child(args: argparse.Namespace) -> None:
    """One process: load, one warm-up forward, ``repeats`` timed ones; a JSON line on stdout."""
    opts = load_options(TestOptions, args.opt, args.set)
    device = configure("cpu", 1)
    model = build_model(opts, args.opt, device)
    lq = torch.rand(1, 3, *args.size, generator=torch.Generator().manual_seed(0)) * getattr(model, "input_range", 1.0)
    with torch.no_grad():
        out = model(lq)
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(args.repeats):
            out = model(lq)
        wall, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": wall / args.repeats, "user": (end.ru_utime - usage.ru_utime) / args.repeats,
                      "system": (end.ru_stime - usage.ru_stime) / args.repeats,
                      "page_faults": (end.ru_minflt - usage.ru_minflt) // args.repeats,
                      "peak_rss_gb": end.ru_maxrss / 2 ** 20,
                      "output_sha256": hashlib.sha256(out.numpy().tobytes()).hexdigest()}))


def main(args: argparse.Namespace, command: str) -> None:
    opts = load_options(TestOptions, args.opt, args.set)  # bad options fail here, before any child runs
    runs = {}
    for choice in ("default", "keep"):
        argv = [sys.executable, __file__, "--child", "-opt", args.opt, "--size", *map(str, args.size),
                "--repeats", str(args.repeats), *(x for s in args.set for x in ("--set", s))]
        env = {**os.environ, "CONDIQUANT_MALLOC": choice, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        runs[choice] = json.loads(done.stdout.strip().splitlines()[-1])
    base, kept = runs["default"], runs["keep"]
    result = {"command": command, "model": opts.network_g.get("type"), "checkpoint": opts.path.pretrain_network_g,
              "lr_size": args.size, "threads": 1, "runs": runs, "speedup": base["seconds"] / kept["seconds"],
              "identical_outputs": base["output_sha256"] == kept["output_sha256"]}
    name = f"bench_malloc_{opts.name}"
    atomic_write_text(Path("results") / f"{name}.json", json.dumps(result, indent=1))
    rows = "\n".join(f"| {label} | {r['seconds']:.2f} | {r['user']:.2f} | {r['system']:.2f} | {r['page_faults']} | "
                     f"{r['peak_rss_gb']:.2f} |" for label, r in (("glibc defaults", base), ("kept (ours)", kept)))
    atomic_write_text(Path("results") / f"{name}.md", (
        f"# Freed memory kept in the heap: {opts.name}\n\n`{command}`: one forward of a {args.size[0]}x{args.size[1]} "
        f"LR input, mean of {args.repeats} after a warm-up, one thread per process, both processes in this run.\n\n"
        "| allocator | s / forward | user s | system s | page faults | peak RSS GB |\n|---|---|---|---|---|---|\n"
        f"{rows}\n\nSpeed-up {result['speedup']:.2f}x; outputs bit-identical: "
        f"{'yes' if result['identical_outputs'] else 'NO'}.\n"))
    print((Path("results") / f"{name}.md").read_text())


if __name__ == "__main__":
    parser = option_parser("scripts/bench_malloc.py")
    parser.add_argument("--size", type=int, nargs=2, default=[192, 256], metavar=("H", "W"),
                        help="LR input size (default: an Urban100-sized image)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        child(ns)
    else:
        sys.exit(run_cli(lambda: main(ns, command_line("scripts/bench_malloc.py", None))))
