#!/usr/bin/env python3
"""Regenerate the README's Results section from results/*.md (each file names the command that produced it), and
its "in short" summary from the tables' JSON only.

    python scripts/update_readme.py

The summary compares every row with the 2DQuant row of the same bit-width on Set5, paired by seed: a row is
"better" or "worse" only when the mean paired difference exceeds twice its standard error, else "tied"; rows
with fewer than two seeds in common are not compared. Rows whose Set5 mean is below the table's FP_body_off row
(the FP model without its body) are marked.
"""
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
SUMMARY_START, SUMMARY_END = "<!-- summary:start -->", "<!-- summary:end -->"
BASELINE = "2dquant"


def paired(row: dict, base: dict, dataset: str = "Set5"):
    """(mean difference, its standard error, n) over the seeds both rows ran, or None below two seeds."""
    a = dict(zip(row["seeds"], row["scores"][dataset]["psnr"]))
    b = dict(zip(base["seeds"], base["scores"][dataset]["psnr"]))
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[s] - b[s] for s in common]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return mean, sd / math.sqrt(len(d)), len(d)


def verdict(diff) -> str:
    mean, se, n = diff
    word = "tied" if abs(mean) <= 2 * se else "better" if mean > 0 else "worse"
    return f"{mean:+.2f} ± {se:.2f} dB ({word}, {n} seeds)"


def summary(table_json: Path) -> str:
    data = json.loads(table_json.read_text())
    rows = data["rows"]
    fp = next((r for r in rows if r["method"] == "FP"), None)
    off = next((r for r in rows if r["method"] == "FP_body_off"), None)
    lines = [f"**{table_json.stem}** (Set5, from `results/{table_json.name}`; paired differences to `{BASELINE}`, "
             f"mean ± standard error over seeds; FP {fp['scores']['Set5']['psnr_mean']:.2f} dB"
             + (f", FP with the body off {off['scores']['Set5']['psnr_mean']:.2f} dB; † marks rows below that"
                if off else "") + "):" if fp else ""]
    floor = off["scores"]["Set5"]["psnr_mean"] if off else float("-inf")

    def below(r: dict) -> str:
        return " †" if r["scores"]["Set5"]["psnr_mean"] < floor else ""

    for bits in sorted({r["bits"] for r in rows if r["bits"] < 32}):
        at = [r for r in rows if r["bits"] == bits]
        base = next((r for r in at if r["method"] == BASELINE), None)
        if base is None:
            continue
        parts = [f"{BASELINE} {base['scores']['Set5']['psnr_mean']:.2f}{below(base)}"]
        for r in at:
            if r is base:
                continue
            diff = paired(r, base)
            parts.append(f"{r['method']} " + (verdict(diff) if diff else
                                              f"{r['scores']['Set5']['psnr_mean']:.2f} (one seed, not compared)")
                         + below(r))
        lines.append(f"- W{bits}A{bits}: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md: markers {START} / {END} not found")
    parts = []
    # Method tables (grids with a cells/ cache) first, then FP scores, then ablations, benchmarks and costs.
    def order(md: Path) -> tuple:
        return (not (md.parent / md.stem / "cells").is_dir(), md.stem != "fp_scores", md.name)

    for md in sorted((ROOT / "results").glob("*.md"), key=order):
        body = md.read_text().strip().splitlines()
        title = body[0].lstrip("# ").strip() if body and body[0].startswith("#") else md.stem
        # The file's own headings sit below its "###" title.
        lines = [f"###{line}" if line.startswith("#") else line for line in body[1:]]
        parts.append(f"### {title}\n\n_From `results/{md.name}`._\n\n" + "\n".join(lines).strip())
    section = "\n\n".join(parts) if parts else "No results yet."
    head, rest = text.split(START, 1)
    text = f"{head}{START}\n{section}\n{END}{rest.split(END, 1)[1]}"
    if SUMMARY_START in text and SUMMARY_END in text:
        tables = [p for p in sorted((ROOT / "results").glob("*.json")) if (p.parent / p.stem / "cells").is_dir()]
        short = "\n\n".join(summary(p) for p in tables if "rows" in json.loads(p.read_text())) or "No tables yet."
        head, rest = text.split(SUMMARY_START, 1)
        text = f"{head}{SUMMARY_START}\n{short}\n{SUMMARY_END}{rest.split(SUMMARY_END, 1)[1]}"
    readme.write_text(text)


if __name__ == "__main__":
    main()
