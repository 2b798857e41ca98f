#!/usr/bin/env python3
"""Size, storage ratio, MACs per layer type and 2DQuant-style speed-up of a network at several bit-widths.

    python scripts/model_cost.py -opt options/train/SwinIR_light_x4_2dquant.yml [--lr-size 128 128] \\
        [--bits 4 3 2] [--include-position-bias] [--packed] [--set key.path=value ...]

Cost depends only on shapes, so no weights are loaded. ``--packed`` also writes the network (its random initial
weights, MinMax weight bounds: a packed file's size depends only on shapes and bits) as a packed low-bit file
(``condiquant/deploy/packed.py``) at each bit-width and reports its bytes against the theoretical size. Placement and granularity come from the options' ``quant``
block; bit-width b means w_bit = a_bit = b. Counting rules: ``condiquant/quant/cost.py``. Writes
``results/model_cost_<options file stem>.md`` and prints it.
"""
from __future__ import annotations

import copy
import shlex
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List


from condiquant.archs import build_network
from condiquant.cli import option_parser, run_cli
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.deploy.packed import save_packed
from condiquant.options import QuantOptions, TrainOptions
from condiquant.quant.attach import attach_quantizers
from condiquant.quant.calibrate import ObserverSpec, init_weight_bounds
from condiquant.quant.cost import (KINDS, OpsCost, count_parameters, measure_ops, storage_cost,
                                   twodquant_ops, twodquant_supported)
from condiquant.quant.presets import resolve_placement


def _size(bits: int) -> str:
    """Binary and decimal units side by side: papers mix them (2DQuant's 3.42 "MB" is MiB, its 1.17 MB is MB)."""
    return f"{bits / 8 / 2 ** 20:.3f} MiB ({bits / 8 / 1e6:.3f} MB)"


def _ops_table(costs: List[OpsCost], bits: List[int], labels: List[str]) -> List[str]:
    """MACs per type (the same at every bit-width), then the effective ops and speed-up per bit-width."""
    first = costs[0]
    total, quantized = first.by_kind(), first.by_kind(quantized_only=True)
    lines = [f"| {labels[0]} | G ops | share | quantized G ops |", "|---|---|---|---|"]
    for kind, label in zip(KINDS, labels[1:]):
        lines.append(f"| {label} | {total[kind] / 1e9:.4f} | {100 * total[kind] / first.total:.2f}% | "
                     f"{quantized[kind] / 1e9:.4f} |")
    lines += [f"| total | {first.total / 1e9:.4f} | 100% | {sum(quantized.values()) / 1e9:.4f} |", "",
              "| bits | effective G ops (quantized x b/32 + rest) | speed-up |", "|---|---|---|"]
    lines += [f"| W{b}A{b} | {c.effective / 1e9:.4f} | {c.speedup:.2f} |" for b, c in zip(bits, costs)]
    return lines


def _packed_table(model, quants: List[QuantOptions], network_g) -> List[str]:
    lines = ["", "## Packed file", "",
             "Written by `condiquant/deploy/packed.py` from the network's random initial weights (the size depends only on "
             "shapes and bits); theoretical = 32 (P - Q) + b Q bits + 64 bits per (l, u) "
             "pair of the weight quantizers (every other stored tensor, quantizer bounds included, at 32 bits).", "",
             "| bits | packed file | theoretical | overhead |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for q in quants:
            m = copy.deepcopy(model)
            attach_quantizers(m, q)
            init_weight_bounds(m, ObserverSpec("minmax"))
            size = save_packed(Path(tmp) / "m.cqpack", m, network_g, q)
            lines.append(f"| W{q.w_bit}A{q.a_bit} | {size.file_bytes:,} B | {size.theoretical_bytes:,.0f} B | "
                         f"{100 * size.overhead:+.2f}% |")
    return lines


def render(source: str, command: str, opts: TrainOptions, bits: List[int], lr_size: List[int],
           include_position_bias: bool, packed: bool = False) -> str:
    model = build_network(opts.network_g, f"{source} network_g")
    arch = opts.network_g["type"]
    placement = resolve_placement(arch, opts.quant.placement, f"{source} quant.placement")
    quants = [replace(opts.quant, w_bit=b, a_bit=b, placement=placement) for b in bits]
    for q in quants:
        q.validate(f"--bits {q.w_bit}")
    storage = [storage_cost(model, q, include_position_bias) for q in quants]
    measured = [measure_ops(model, q, lr_size) for q in quants]
    h, w = lr_size
    p, pq = storage[0].params, storage[0].quantized_params
    tables = count_parameters(model, include_position_bias=True) - count_parameters(model)
    table_rule = ("" if not tables else
                  f" (SwinIR's relative-position-bias tables, {tables:,} parameters, "
                  f"{'included' if include_position_bias else 'excluded, as 2DQuant does'})")
    lines = [
        f"# Model cost: {arch} x{opts.scale} ({source})", "",
        f"Produced by `{command}`. Computed from the model's shapes; no weights are loaded.", "",
        f"**What is counted.** P = {p:,} parameters: every parameter{table_rule}; buffers (BatchNorm statistics, "
        f"masks, index tables) are not parameters. Q = {pq:,} of them are quantized: the weights of the layers "
        f"with a weight quantizer (placement: the {arch} preset unless the options override it; weight "
        f"granularity {opts.quant.w_granularity}), at b bits; biases, quantizer bounds and all other parameters "
        f"stay 32-bit; ratio = 32 P / (32 (P - Q) + b Q). Ops are multiply-accumulates of every Linear, Conv2d "
        f"and attention product (MatMul) in one forward pass of a 1x3x{h}x{w} LR input (hooks on a meta-device "
        f"pass, exact shapes); 'other' is one op per output element of the normalisation layers; activations, "
        f"softmax, residual adds, padding, pixel shuffles and fixed channel shifts (EMT) are not counted. "
        f"Speed-up is 2DQuant's definition: total / (ops of quantized layers x b/32 + all other ops at full "
        f"cost), a theoretical ratio, not a measured latency.", "",
        "## Storage", "",
        "| bits | FP size | quantized size | storage ratio |", "|---|---|---|---|"]
    lines += [f"| W{b}A{b} | {_size(s.fp_bits)} | {_size(s.bits)} | {s.ratio:.2f} |" for b, s in zip(bits, storage)]
    if packed:
        lines += _packed_table(model, quants, opts.network_g)
    lines += ["", f"## Operations at LR {h}x{w}, measured", ""]
    lines += _ops_table(measured, bits, ["type", "Linear", "MatMul (attention products)", "Conv2d",
                                         "other (normalisation elements)"])
    if twodquant_supported(model):
        booked = [twodquant_ops(model, m) for m in measured]
        lines += ["", f"## Operations at LR {h}x{w}, counted as 2DQuant's code counts them", "",
                  "2DQuant's `flops_all` (its swinir_arch.py): conv_after_body counted as H W 3 C C (a third of "
                  "its true cost), the upsampler conv as H W C 3 9 (3 output channels instead of 3 s^2) and booked "
                  "under other, the final LayerNorm not counted. Kept to show where the paper's split and "
                  "speed-ups come from; the measured section above is the true count.", ""]
        lines += _ops_table(booked, bits, ["type", "Linear", "MatMul (BMM)", "Conv2d", "other"])
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    parser = option_parser("scripts/model_cost.py")
    parser.add_argument("--lr-size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"),
                        help="LR input size of the counted forward pass (2DQuant: 128 128)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="bit-widths b (WbAb)")
    parser.add_argument("--include-position-bias", action="store_true",
                        help="count SwinIR's relative-position-bias tables in P")
    parser.add_argument("--packed", action="store_true", help="also write packed files and report their sizes")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/model_cost.py", *argv])
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    text = render(args.opt, command, opts, args.bits, args.lr_size, args.include_position_bias, args.packed)
    out = Path("results") / f"model_cost_{Path(args.opt).stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text + f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
