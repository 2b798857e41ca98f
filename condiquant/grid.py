"""Reproduce a results table: every (method, bits) cell is calibrated with train.py's pipeline and scored with
test.py's; finished cells are cached in ``results/<table>/cells/`` so an interrupted CPU run resumes."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml

from condiquant.config import apply_overrides, from_dict, load_yaml
from condiquant.evaluate import run_test
from condiquant.options import TableOptions, TestOptions, TrainOptions, VariantOptions
from condiquant.ptq import run_train
from condiquant.runtime import LOG_FORMAT

log = logging.getLogger("condiquant")


def _cell_id(method: str, bits: int) -> str:
    return "FP" if method == "FP" else "Bicubic" if method == "Bicubic" else f"{method}_W{bits}A{bits}"


def _test_options(table: TableOptions, name: str, **changes: Any) -> TestOptions:
    base = from_dict(TestOptions, load_yaml(table.test_opt), f"{table.test_opt}:")
    datasets = {k: d for k, d in base.datasets.items() if table.datasets is None or d.name in table.datasets}
    return replace(base, name=name, datasets=datasets, **changes)


def cell_train_options(table: TableOptions, method: str, bits: int, name: str) -> Tuple[TrainOptions, str]:
    """The train options of a (method or variant, bits) cell, and the file they come from."""
    variant = table.variants.get(method, VariantOptions(method))
    source = variant.train_opt or table.train_opt
    data = apply_overrides(load_yaml(source), [f"{k}={json.dumps(v)}" for k, v in {
        **table.train_overrides, **variant.overrides, "name": name, "method": variant.method,
        "quant.w_bit": bits, "quant.a_bit": bits,
    }.items()], source)
    return from_dict(TrainOptions, data, f"{source}:"), source


def load_table(opt_path: str, overrides: List[str]) -> TableOptions:
    return from_dict(TableOptions, apply_overrides(load_yaml(opt_path), overrides, opt_path), f"{opt_path}:")


def run_cell(table: TableOptions, method: str, bits: int, out_dir: Path) -> Dict[str, Any]:
    """``method``: a column of the table (a method, or a variant's name)."""
    cell = _cell_id(method, bits)
    name = f"{table.name}_{cell}"
    tic = time.perf_counter()
    train_seconds = 0.0
    if method == "FP":
        opts = _test_options(table, name)
    elif method == "Bicubic":
        base = _test_options(table, name)
        opts = replace(base, network_g={"type": "Bicubic", "upscale": base.scale},
                       path=replace(base.path, pretrain_network_g=None), reference=None)
    else:
        train_opts, source = cell_train_options(table, method, bits, name)
        ckpt = Path("experiments") / name / "models" / "net_q_latest.pth"
        if not ckpt.is_file():  # a checkpoint from an interrupted grid run is reused as is
            ckpt = run_train(train_opts, source, f"scripts/reproduce.py cell {cell}")
        train_seconds = time.perf_counter() - tic
        base = _test_options(table, name)
        opts = replace(base, network_g=train_opts.network_g, path=replace(base.path, pretrain_network_g=str(ckpt)),
                       reference=None)
    scores = run_test(opts, table.test_opt, f"scripts/reproduce.py cell {cell}")
    result = {"cell": cell, "method": method, "bits": bits, "train_seconds": train_seconds,
              "total_seconds": time.perf_counter() - tic,
              "scores": {s.name: {"psnr": s.psnr, "ssim": s.ssim} for s in scores}}
    path = out_dir / "cells" / f"{cell}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def cells(table: TableOptions) -> List[tuple]:
    grid = [("FP", 32)] if table.include_fp else []
    grid += [("Bicubic", 32)] if table.include_bicubic else []
    return grid + [(m, b) for b in table.bits for m in table.methods
                   if m not in table.variants or table.variants[m].bits is None or b in table.variants[m].bits]


def load_paper(key: str | None) -> Dict[str, Any]:
    if not key:
        return {}
    return yaml.safe_load((Path(__file__).with_name("paper_tables.yml")).read_text()).get(key, {})


def render(table: TableOptions, results: List[Dict[str, Any]], command: str) -> str:
    names = [d for d in (results[0]["scores"] if results else [])]
    paper = load_paper(table.paper)
    lines = [f"# {table.name}", "",
             f"Produced by `{command}` (train options `{table.train_opt}`, test options `{table.test_opt}`).",
             "PSNR (dB) / SSIM on Y. Columns marked *paper* are published numbers, not ours"
             + (f" ({paper.get('source')})" if paper else "") + "."]
    for label, v in table.variants.items():
        lines.append(f"- row `{label}`: method `{v.method}`, options `{v.train_opt or table.train_opt}`"
                     + "".join(f", `{k}={json.dumps(x)}`" for k, x in v.overrides.items()) + ".")
    lines.append("")
    header = "| method | bits | " + " | ".join(names) + (" | " + " | ".join(f"{n} *paper*" for n in names)
                                                       if paper else "") + " | calibration s | total s |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        ours = " | ".join(f"{r['scores'][n]['psnr']:.2f} / {r['scores'][n]['ssim']:.4f}" for n in names)
        row = f"| {r['method']} | {r['bits']} | {ours}"
        if paper:
            cell = paper.get("rows", {}).get(r["cell"], {})
            row += " | " + " | ".join(cell.get(n, "–") for n in names)
        lines.append(row + f" | {r['train_seconds']:.0f} | {r['total_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def run_table(opt_path: str, overrides: List[str], command: str) -> Path:
    table = load_table(opt_path, overrides)
    out_dir = Path("results") / table.name
    out_dir.mkdir(parents=True, exist_ok=True)
    # One log for the whole table (appended across resumed runs), beside the per-cell logs.
    handler = logging.FileHandler(Path("results") / f"{table.name}.log")
    handler.setFormatter(LOG_FORMAT)
    log.addHandler(handler)
    log.info("table %s: %s", table.name, command)
    try:
        results = _run_cells(table, out_dir, command)
    finally:
        log.removeHandler(handler)
        handler.close()
    md = Path("results") / f"{table.name}.md"
    md.write_text(render(table, results, command))
    (Path("results") / f"{table.name}.json").write_text(json.dumps({"command": command, "cells": results},
                                                                   indent=2))
    return md


def _run_cells(table: TableOptions, out_dir: Path, command: str) -> List[Dict[str, Any]]:
    results = []
    for method, bits in cells(table):
        cached = out_dir / "cells" / f"{_cell_id(method, bits)}.json"
        if cached.is_file():
            results.append(json.loads(cached.read_text()))
            continue
        results.append(run_cell(table, method, bits, out_dir))
        log.info("cell %s done in %.0f s", results[-1]["cell"], results[-1]["total_seconds"])
        (Path("results") / f"{table.name}.md").write_text(render(table, results, command))
    return results
