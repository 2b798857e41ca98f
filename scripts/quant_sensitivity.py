#!/usr/bin/env python3
"""Which quantizers cost the most? Bounds from one observer (or a trained quantized checkpoint), then PSNR on the
calibration validation split with only a group of quantizers enabled (never a test set).

    python scripts/quant_sensitivity.py -opt options/train/EMT_x4_2dquant.yml [--observer dobi] [--set k=v ...]
    python scripts/quant_sensitivity.py -opt <train yml> --checkpoint experiments/<run>/models/net_q_latest.pth \
        --per-module

Groups: all, weights only, activations only, per module kind (last name component of the quantized module, e.g.
fc1, qk_matmuls), and with ``--per-module`` the input quantizers of each quantized module alone; ``--groups`` keeps
only the listed ones. ``--bias-correction`` scores every group a second time after empirical bias correction (each
quantized layer's bias absorbs the mean output change that weight quantization causes on FP inputs, over the
bound-initialisation crops: ``condiquant/transforms/bias_correction.py``, the training option
``bound_init.bias_correction``). Writes results/sensitivity_<name>.md (``name`` of the options, or of the checkpoint's
run folder).
"""
from __future__ import annotations

import shlex
import sys
from collections import defaultdict
from pathlib import Path

import torch


from condiquant.cli import option_parser
from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.engine.loop import validation_psnr
from condiquant.options import TrainOptions
from condiquant.ptq import validation_context
from condiquant.quant.checkpoint import build_quantized, quant_options_of
from condiquant.quant.attach import named_quantizers, quant_modules
from condiquant.runtime import setup_logger
from condiquant.transforms.bias_correction import correct_biases


def module_kind(name: str) -> str:
    """'body.0.mlp_list.3.fc1' -> 'fc1'; 'body.0.sa_list.0.qk_matmuls.1' -> 'qk_matmuls' (drop list indices)."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    return parts[-1]


def main() -> None:
    parser = option_parser("scripts/quant_sensitivity.py")
    parser.add_argument("--observer", default="dobi", choices=["minmax", "percentile", "dobi"])
    parser.add_argument("--checkpoint", help="quantized checkpoint whose bounds to score (instead of --observer)")
    parser.add_argument("--per-module", action="store_true", help="also each module's input quantizers alone")
    parser.add_argument("--groups", help="comma-separated group labels to score (default: every group)")
    parser.add_argument("--bias-correction", action="store_true",
                        help="score the groups again after empirical bias correction of the quantized layers")
    args = parser.parse_args()
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/quant_sensitivity.py", *sys.argv[1:]])
    opts = from_dict(TrainOptions, apply_overrides(load_yaml(args.opt), args.set, args.opt), f"{args.opt}:")
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and (not ckpt.is_file() or quant_options_of(ckpt) is None):
        print(f"--checkpoint: not a quantized checkpoint: {ckpt}", file=sys.stderr)
        sys.exit(2)
    name = opts.name if ckpt is None else ckpt.parent.parent.name
    out = Path("results") / f"sensitivity_{name}.md"
    out.parent.mkdir(exist_ok=True)
    logger = setup_logger(out.with_suffix(".log"))
    ctx = validation_context(opts, args.opt, out.parent, logger)
    fp, calib = ctx.fp_model, ctx.calib
    if ckpt is None:
        quant, source = ctx.quant, f"{args.observer} bounds"
        model = ctx.quantized_copy()
        ctx.init_bounds(model, args.observer)
    else:
        quant, source = quant_options_of(ckpt), f"bounds of `{ckpt}`"
        model = build_quantized(ckpt, opts.network_g, "-opt").to(ctx.device).eval()
    quantizers = dict(named_quantizers(model))
    all_weights = {n for n in quantizers if ".weight_quantizers." in n}
    groups = {"all": set(quantizers), "weights only": all_weights, "activations only": set(quantizers) - all_weights}
    by_kind = defaultdict(set)
    for mod_name, module in quant_modules(model):
        for q_name, _ in named_quantizers(module):
            by_kind[module_kind(mod_name)].add(f"{mod_name}.{q_name}")
    groups.update({f"only {k}": v for k, v in sorted(by_kind.items())})
    if args.per_module:
        for mod_name, module in quant_modules(model):
            names = {f"{mod_name}.{q}" for q, _ in named_quantizers(module) if ".weight_quantizers." not in f".{q}"}
            if names:
                groups[f"inputs of {mod_name}"] = names

    if args.groups:
        wanted = [g.strip() for g in args.groups.split(",")]
        unknown = [g for g in wanted if g not in groups]
        if unknown:
            print(f"--groups: no group {unknown[0]!r} (groups: {', '.join(groups)})", file=sys.stderr)
            sys.exit(2)
        groups = {g: groups[g] for g in wanted}

    def score(tag: str, only=lambda names: True) -> list:
        psnrs = []
        for label, names in groups.items():
            if not only(names):
                psnrs.append(None)
                continue
            for n, q in quantizers.items():
                q.enabled = n in names
            psnrs.append(validation_psnr(model, ctx))
            logger.info("%s%s: %.3f dB", label, tag, psnrs[-1])
        for q in quantizers.values():
            q.enabled = True
        return psnrs

    fp_psnr = validation_psnr(fp, ctx)
    columns = [score("")]
    header = "| enabled quantizers | count | PSNR (dB) | vs FP |"
    if args.bias_correction:
        n_layers = len(correct_biases(model, ctx.calibration_batches(), ctx.input_range))
        # the corrected biases compensate the quantized weights: only groups that quantize all of them are meaningful
        columns.append(score(" (bias-corrected)", lambda names: all_weights <= names))
        header += " bias-corrected | vs FP |"
        source += f", then empirical bias correction of {n_layers} layers"
    def cell(psnr) -> str:
        return "– | –" if psnr is None else f"{psnr:.2f} | {psnr - fp_psnr:+.2f}"

    rows = [f"| {label} | {len(names)} | " + " | ".join(cell(c[i]) for c in columns) + " |"
            for i, (label, names) in enumerate(groups.items())]
    text = "\n".join([
        f"# Quantizer sensitivity: {opts.name}", "",
        f"Produced by `{command}`. {source} (W{quant.w_bit}A{quant.a_bit}, weights per "
        f"{quant.w_granularity}); PSNR on the calibration validation split ({len(calib.val_paths)} images, "
        f"LR centre crops of {opts.calib.val_patch_size}), FP {fp_psnr:.2f} dB; only the listed quantizers enabled.",
        "", header, "|---|---|" + "---|---|" * len(columns), *rows])
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
