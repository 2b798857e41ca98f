#!/usr/bin/env python3
"""Gather test.py results into one Markdown table: ours beside the reference numbers.

    python scripts/collect_scores.py OUT.md options/test/IMDN_x2.yml [...]

Reads results/<name>/metrics.json of each options file's run (run test.py first).
"""
import json
import sys
from pathlib import Path


from condiquant.config import from_dict, load_yaml
from condiquant.scoring import load_references
from condiquant.options import TestOptions


def main(out: str, option_files: list) -> None:
    lines = ["# Full-precision scores", "",
             f"Produced by `bash scripts/score_fp.sh` (test.py per options file, then "
             f"`python scripts/collect_scores.py {out} ...`). PSNR (dB) / SSIM on Y, crop border = scale.",
             "Reference columns are other people's numbers (source given), not ours.", "",
             "| model | dataset | ours PSNR / SSIM | reference PSNR / SSIM | difference (dB) | reference source |",
             "|---|---|---|---|---|---|"]
    for path in option_files:
        opts = from_dict(TestOptions, load_yaml(path), f"{path}:")
        report = json.loads((Path("results") / opts.name / "metrics.json").read_text())
        refs = load_references(opts.reference)
        for name, score in report["datasets"].items():
            ref = refs.get(name, {})
            ref_text = f"{ref['psnr']:.3f}" + (f" / {ref['ssim']:.4f}" if "ssim" in ref else "") if ref else "–"
            diff = f"{score['psnr'] - ref['psnr']:+.3f}" if ref else "–"
            lines.append(f"| {opts.network_g['type']} x{opts.scale} | {name} | {score['psnr']:.3f} / "
                         f"{score['ssim']:.4f} | {ref_text} | {diff} | {ref.get('source', '–')} |")
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
