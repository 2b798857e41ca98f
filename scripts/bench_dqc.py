#!/usr/bin/env python3
"""Seconds per DQC iteration and the fake-quantization slowdown versus FP, measured in one run.

    python scripts/bench_dqc.py -opt options/train/EMT_x4_2dquant.yml [--iters 3] [--set key=value ...]

Uses the options' network, quantizer placement and DQC batch/patch size. Bounds come from a quick MinMax pass
(timing does not depend on their values). Prints a Markdown table and writes it to
results/bench_dqc_<options stem>.md.
"""
from __future__ import annotations

import shlex
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


from condiquant.cli import option_parser
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.options import TrainOptions
from condiquant.ptq import calibration_images, load_fp_model, resolved_quant
from condiquant.quant.attach import attach_quantizers, bound_parameters
from condiquant.quant.calibrate import ObserverSpec, init_bounds
from condiquant.runtime import configure


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    tic = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - tic) / repeats


def main() -> None:
    parser = option_parser("scripts/bench_dqc.py")
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    device = configure(opts.device, opts.num_threads, opts.manual_seed)
    fp = load_fp_model(opts, args.opt, device)
    quant = resolved_quant(opts, args.opt)
    qmodel = copy.deepcopy(fp)
    attach_quantizers(qmodel, quant)
    r = float(getattr(fp, "input_range", 1.0))
    calib = calibration_images(opts, args.opt)
    rng = np.random.default_rng(0)
    d = opts.dqc
    x = calib.random_crops(d.batch_size, d.patch_size, rng).to(device) * r
    init_bounds(qmodel, [x / r], ObserverSpec("minmax"), (), r)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    params = bound_parameters(qmodel)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=d.lr)

    def fp_forward():
        with torch.no_grad():
            fp(x)

    def q_forward():
        with torch.no_grad():
            qmodel(x)

    def dqc_step():
        with torch.no_grad():
            target = fp(x)
        loss = F.l1_loss(qmodel(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    t_fp, t_q, t_step = timed(fp_forward, args.iters), timed(q_forward, args.iters), timed(dqc_step, args.iters)
    rows = [
        f"# DQC benchmark: {opts.network_g['type']} x{opts.scale} W{quant.w_bit}A{quant.a_bit}",
        "",
        f"`{' '.join(shlex.quote(a) for a in ['python', 'scripts/bench_dqc.py', *sys.argv[1:]])}`: "
        f"batch {d.batch_size} x {d.patch_size}x{d.patch_size} LR, {torch.get_num_threads()} threads, {device}, "
        f"mean of {args.iters} after one warm-up.",
        "",
        "| measure | seconds | ratio |",
        "|---|---|---|",
        f"| FP forward | {t_fp:.3f} | 1.00 |",
        f"| fake-quant forward | {t_q:.3f} | {t_q / t_fp:.2f} |",
        f"| DQC iteration (teacher fwd + student fwd/bwd + Adam) | {t_step:.3f} | {t_step / t_fp:.2f} |",
        "",
        f"{d.total_iter} DQC iterations at this speed: {d.total_iter * t_step / 60:.1f} min.",
    ]
    text = "\n".join(rows)
    print(text)
    out = Path("results") / f"bench_dqc_{Path(args.opt).stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
