"""The README's main job: quantize the shipped default, score FP and quantized side by side, draw a comparison.

    python scripts/quickstart.py [-opt options/quickstart.yml] [--set key.path=value ...]   (or condiquant-quickstart)

Runs train.py's pipeline on the options (default: EMT x4 W4A4, 2DQuant at a short CPU schedule), scores the FP
model and the quantized checkpoint on Set5 and Set14 with test.py's protocol, writes
``results/<name>_compare.png`` (HR / bicubic / FP / quantized crops of Set5 butterfly) and prints where
everything is and what to run next.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import yaml

from condiquant import figures
from condiquant.options import DatasetOptions, TestOptions, TrainOptions
from condiquant.ptq import run_train
from condiquant.scoring import run_test

BENCH = "datasets/benchmark"


def quickstart(opts: TrainOptions, source: str, command: str) -> None:
    tic = time.perf_counter()
    s = opts.scale
    datasets = {n: DatasetOptions(name=n, dataroot_gt=f"{BENCH}/{n}/HR", dataroot_lq=f"{BENCH}/{n}/LR_bicubic/X{s}",
                                  filename_tmpl=f"{{}}x{s}") for n in ("Set5", "Set14")}
    base = TestOptions(name=f"{opts.name}_FP", scale=s, network_g=opts.network_g, datasets=datasets,
                       device=opts.device, num_threads=opts.num_threads)
    base = replace(base, path=replace(base.path, pretrain_network_g=opts.path.pretrain_network_g))
    ckpt = run_train(opts, source, command)
    fp = run_test(base, source, command)
    quant = run_test(replace(base, name=f"{opts.name}_quantized",
                             path=replace(base.path, pretrain_network_g=str(ckpt))), source, command)
    figure = Path("results") / f"{opts.name}_compare.png"
    test_yml = Path("experiments") / opts.name / "compare_test.yml"  # the FP network for the figure's panels
    test_yml.write_text(yaml.safe_dump({"name": "compare", "scale": s, "network_g": dict(opts.network_g),
                                        "path": {"pretrain_network_g": opts.path.pretrain_network_g},
                                        "datasets": {"t": {"name": "Set5", "dataroot_gt": f"{BENCH}/Set5/HR"}}}))
    q = opts.quant
    figures.main(["--image", f"{BENCH}/Set5/HR/butterfly.png", "--scale", str(s), "--box", "112", "112",
                            "64", "64", "--entry", f"FP={test_yml}",
                            "--entry", f"{opts.method} W{q.w_bit}A{q.a_bit}={ckpt}", "--network", str(test_yml),
                            "--out", str(figure)])
    rows = ["", f"{'':10s} {'FP':>16s} {f'{opts.method} W{q.w_bit}A{q.a_bit}':>22s}"]
    for f, qs in zip(fp, quant):
        rows.append(f"{f.name:10s} {f.psnr:8.2f} / {f.ssim:.4f} {qs.psnr:12.2f} / {qs.ssim:.4f}")
    print("\n".join(rows + [
        "", f"PSNR (dB) / SSIM on Y, x{s}; {time.perf_counter() - tic:.0f} s in all.",
        f"quantized checkpoint: {ckpt}", f"experiment folder:    experiments/{opts.name}/ (log, resolved options)",
        f"scores:               results/{opts.name}_FP/, results/{opts.name}_quantized/ (metrics.md/json)",
        f"comparison figure:    {figure}", "", "next:",
        "  other bits:     python scripts/quickstart.py --set quant.w_bit=2 --set quant.a_bit=2",
        "  other methods:  python train.py -opt options/train/EMT_x4_2dquant.yml --set method=condiquant",
        "  packed file:    python scripts/export.py --checkpoint " + str(ckpt),
        "  the paper's SwinIR-light setting: python scripts/fetch_assets.py --download --only '*SwinIR-S_x4*' "
        "&& python train.py -opt options/x4_4bit.yml",
        "  the x4 tables:  python scripts/reproduce.py -opt options/tables/emt_x4.yml"]))
