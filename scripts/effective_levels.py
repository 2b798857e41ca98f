#!/usr/bin/env python3
"""How many integer codes can each quantizer of a trained checkpoint produce?

    python scripts/effective_levels.py experiments/<name>/models/net_q_latest.pth [...]

A uniform grid has 2^b codes by construction. CompSRT's grid (``quant.hadamard``) rounds
(clip(y, l, u) - Z) / s with s = (u - l) / (2^b - 1) + alpha and Z = l + beta and does not clamp the code (as its
released code), so once DQC has moved alpha the codes of [l, u] span round((u - l - beta) / s) - round(-beta / s) + 1
values (in absolute value: with s < 0 the codes descend), which can exceed 2^b; with ``quant.hadamard_codes: clamped``
only those of them within 0 .. 2^b - 1 remain (at least one). Reported per checkpoint: quantizers and channels,
the share of channels with more than 2^b codes, the median count, and alpha in units of the nominal step.
Writes ``results/effective_levels_<experiment>.md``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from condiquant.cli import run_cli
from condiquant.config import ConfigError
from condiquant.quant.checkpoint import _load


def levels(params: dict, w_bits: int, a_bits: int, clamped: bool = False) -> dict:
    names = sorted({k[: -len(".lower")] for k in params if k.endswith(".lower")})
    counts, alphas, over, negative = [], [], [], []
    for n in names:
        bits = w_bits if ".weight_quantizers." in n else a_bits
        lo, hi = params[f"{n}.lower"].double(), params[f"{n}.upper"].double()
        nominal = (hi - lo) / (2 ** bits - 1)
        if f"{n}.alpha" not in params:
            count = torch.full_like(lo, 2 ** bits)
        else:
            a, b = params[f"{n}.alpha"].double(), params[f"{n}.beta"].double()
            s = nominal + a
            ends = torch.stack([torch.round(-b / s), torch.round((hi - lo - b) / s)])  # s < 0: codes descend
            first, last = ends.min(0).values, ends.max(0).values
            if clamped:
                first, last = first.clamp(0, 2 ** bits - 1), last.clamp(0, 2 ** bits - 1)
            count = last - first + 1
            alphas.append(a / nominal)
            negative.append(s < 0)
        counts.append(count)
        over.append(count > 2 ** bits)
    c = torch.cat(counts).numpy()
    al = torch.cat(alphas).numpy() if alphas else np.zeros(1)
    return {"quantizers": len(names), "channels": int(c.size), "over": float(torch.cat(over).double().mean()),
            "negative": float(torch.cat(negative).double().mean()) if negative else 0.0, "median": float(np.median(c)),
            "alpha_median": float(np.median(al)), "alpha_min": float(al.min()), "alpha_max": float(al.max())}


def main(paths) -> None:
    if not paths:
        raise ConfigError("give one or more quantized checkpoints (experiments/<name>/models/net_q_latest.pth)")
    lines = ["# Effective integer codes per quantizer", "",
             f"`python scripts/effective_levels.py {' '.join(paths)}`", "",
             "| checkpoint | bits | quantizers | channels | > 2^b codes | step s < 0 | median codes | "
             "alpha / nominal step (median, min, max) |", "|---|---|---|---|---|---|---|---|"]
    for p in paths:
        ckpt = _load(Path(p))
        if not isinstance(ckpt, dict) or "quant" not in ckpt:
            raise ConfigError(f"{p}: not a quantized checkpoint")
        w_bits, a_bits = int(ckpt["quant"]["w_bit"]), int(ckpt["quant"]["a_bit"])
        r = levels(ckpt["params"], w_bits, a_bits, ckpt["quant"].get("hadamard_codes") == "clamped")
        lines.append(f"| `{p}` | W{w_bits}A{a_bits} | {r['quantizers']} | {r['channels']} | {100 * r['over']:.1f}% | "
                     f"{100 * r['negative']:.1f}% | {r['median']:.0f} | {r['alpha_median']:.3f}, "
                     f"{r['alpha_min']:.2f}, {r['alpha_max']:.2f} |")
    out = Path("results") / f"effective_levels_{Path(paths[0]).parents[1].name}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    raise SystemExit(run_cli(lambda: main(sys.argv[1:])))
