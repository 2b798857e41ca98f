"""Reproduce a results table: every (row, bits) cell is calibrated with train.py's pipeline and scored with
test.py's, over several seeds; finished runs are cached in ``results/<table>/cells/<cell>/`` so an interrupted CPU
run resumes, and a cache entry can never go stale:

- each run's file carries a ``key``: the hash of its fully resolved train and test options, its seed and its
  thread count; a file (or an experiment checkpoint) whose key differs from the one asked for is recomputed;
- each file also carries the ``code`` fingerprint of the package that made it (a hash of ``condiquant/``) and the
  git ``commit``; a file made by other code is reused only if ``--check`` re-ran at least two of that code's runs
  on today's code and they agreed within the reported seed std (a *bridge*, ``results/<table>/bridges.json``), or
  through a chain of such bridges (each link re-ran runs of its older code on its newer one; the table lists
  every link it stands on); otherwise it is recomputed.

Protocol (issue "Trustworthy tables"): a trained row runs ``seeds`` (more, ``extra_seeds``, when its validation
std exceeds ``std_threshold``); each seed is scored on the calibration validation split and on ``seed_datasets``
(Set5); the other datasets are scored once, on the checkpoint of the seed with the median validation PSNR.
Untrained rows run the first seed only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from condiquant.archs import build_network
from condiquant.config import apply_overrides, from_dict, load_yaml, to_dict
from condiquant.engine.state import atomic_write_text
from condiquant.engine.loop import validation_psnr
from condiquant.scoring import run_test, zero_outputs
from condiquant.options import TableOptions, TestOptions, TrainOptions, VariantOptions
from condiquant.ptq import run_train, validation_context
from condiquant.runtime import LOG_FORMAT

log = logging.getLogger("condiquant")
PACKAGE = Path(__file__).resolve().parent
UNTRAINED = ("minmax", "percentile", "dobi", "noisyquant", "repq", "ptq4vit")
# Rows of a fixed model, nothing calibrated: one seed, every dataset scored. FP_body_off: TableOptions.body_off.
REFERENCE = ("FP", "Bicubic", "FP_body_off")


def code_fingerprint() -> str:
    """sha256 (first 16 hex) over the package's source files, as they are on disk (clean or not)."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".yml") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=PACKAGE, capture_output=True,
                               text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _cell_id(method: str, bits: int) -> str:
    return method if method in REFERENCE else f"{method}_W{bits}A{bits}"


def _test_options(table: TableOptions, name: str, datasets: Optional[List[str]] = None, **changes: Any) -> TestOptions:
    base = from_dict(TestOptions, load_yaml(table.test_opt), f"{table.test_opt}:")
    wanted = datasets if datasets is not None else table.datasets
    chosen = {k: d for k, d in base.datasets.items() if wanted is None or d.name in wanted}
    return replace(base, name=name, datasets=chosen, **changes)


def cell_train_options(table: TableOptions, method: str, bits: int, name: str,
                       seed: Optional[int] = None) -> Tuple[TrainOptions, str]:
    """The train options of a (row, bits) cell at ``seed`` (None: the options file's), and their source file."""
    variant = table.variants.get(method, VariantOptions(method))
    source = variant.train_opt or table.train_opt
    sets = {**table.train_overrides, **variant.overrides, "name": name, "method": variant.method,
            "quant.w_bit": bits, "quant.a_bit": bits}
    if seed is not None:
        sets["manual_seed"] = seed
    data = apply_overrides(load_yaml(source), [f"{k}={json.dumps(v)}" for k, v in sets.items()], source)
    return from_dict(TrainOptions, data, f"{source}:"), source


def load_table(opt_path: str, overrides: List[str]) -> TableOptions:
    table = from_dict(TableOptions, apply_overrides(load_yaml(opt_path), overrides, opt_path), f"{opt_path}:")
    if table.body_off:  # a module of the network? (checked on the bare arch, before any run)
        net = from_dict(TestOptions, load_yaml(table.test_opt), f"{table.test_opt}:").network_g
        zero_outputs(build_network(net, f"{table.test_opt} network_g"), [table.body_off], f"{opt_path} body_off")
    return table


def explicit(obj: Any) -> Dict[str, Any]:
    """The fields of a dataclass tree that differ from their schema defaults (nested dataclasses recursed).

    A run key hashes this, not the full tree: a field added later with a default leaves earlier keys valid (what
    the default does is code, which the code fingerprint and ``--check`` cover), while any option a run set
    differently from another gives another key."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = explicit(value)
            if sub:
                out[f.name] = sub
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING or value != default:
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def run_key(train: Optional[TrainOptions], test: TestOptions, seed: int, threads: int) -> str:
    """Hash of everything that decides a run's numbers except the code: the options set (names excluded), seed,
    threads."""
    data = {"train": {k: v for k, v in explicit(train).items() if k != "name"} if train is not None else None,
            "test": {k: v for k, v in explicit(test).items() if k != "name"}, "seed": seed, "threads": threads}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Missing(Exception):
    """A run the table needs is not cached, and the cache is read-only (``--cached``)."""


class Cache:
    """The cells folder of a table, with the bridges that let runs of older code stand; ``readonly``: a run that
    is not cached raises :class:`Missing` instead of being computed."""

    def __init__(self, out_dir: Path, readonly: bool = False):
        self.readonly = readonly
        self.dir = out_dir / "cells"
        self.code = code_fingerprint()
        self.commit = git_commit()
        self.bridges_path = out_dir / "bridges.json"
        self.bridges: List[Dict[str, Any]] = (json.loads(self.bridges_path.read_text())
                                              if self.bridges_path.is_file() else [])

    def chain(self, code: str, target: Optional[str] = None) -> Optional[List[Dict[str, Any]]]:
        """The agreeing bridges that lead from ``code`` to ``target`` (default: today's code), oldest first ([] for
        the target itself); None if there is no such path. Each link re-ran cached runs of its older code on its
        newer one."""
        target = target or self.code
        paths: Dict[str, List[Dict[str, Any]]] = {target: []}
        frontier = [target]
        while frontier:  # breadth first, backwards from today's code
            to = frontier.pop(0)
            for b in self.bridges:
                if b["ok"] and b["to_code"] == to and b["from_code"] not in paths:
                    paths[b["from_code"]] = [b] + paths[to]
                    frontier.append(b["from_code"])
        return paths.get(code)

    def bridged(self, code: str) -> bool:
        return self.chain(code) is not None

    def get(self, path: Path, key: str) -> Optional[Dict[str, Any]]:
        unit = json.loads(path.read_text()) if path.is_file() else None
        if unit is not None and unit.get("key") == key and self.bridged(unit.get("code", "")):
            return unit
        if self.readonly:
            raise Missing(path)
        return None

    def put(self, path: Path, unit: Dict[str, Any]) -> Dict[str, Any]:
        unit = {**unit, "code": self.code, "commit": self.commit, "torch": torch.__version__}
        atomic_write_text(path, json.dumps(unit, indent=1))
        return unit


def _scores(scores) -> Dict[str, Dict[str, float]]:
    return {s.name: {"psnr": s.psnr, "ssim": s.ssim} for s in scores}


def _train(cache: Cache, method: str, bits: int, seed: int, name: str, key: str, train_opts: TrainOptions,
           source: str) -> Tuple[Path, Dict[str, Any]]:
    """Calibrate (or reuse the finished experiment made with the same key and code); returns (ckpt, summary)."""
    exp = Path("experiments") / name
    ckpt, summary_path, stamp = exp / "models" / "net_q_latest.pth", exp / "summary.json", exp / "cell.json"
    made_by = {"key": key, "code": cache.code}
    if ckpt.is_file() and summary_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == made_by:
        return ckpt, json.loads(summary_path.read_text())
    ckpt = run_train(train_opts, source, f"scripts/reproduce.py cell {_cell_id(method, bits)} seed {seed}")
    atomic_write_text(stamp, json.dumps(made_by))
    return ckpt, json.loads(summary_path.read_text())


def run_seed(table: TableOptions, cache: Cache, method: str, bits: int, seed: int) -> Dict[str, Any]:
    """One seed of a cell: trained (or a fixed reference model), scored on the validation split and
    ``seed_datasets`` (reference rows: on every dataset, they have no seeds)."""
    threads = table.num_threads or torch.get_num_threads()
    if method in REFERENCE:
        return _run_reference(table, cache, method, seed, threads)
    cell = _cell_id(method, bits)
    name = f"{table.name}_{cell}_s{seed}"
    path = cache.dir / cell / f"s{seed}.json"
    train_opts, source = cell_train_options(table, method, bits, name, seed)
    train_opts = replace(train_opts, num_threads=threads)
    test_opts = _test_options(table, name, table.seed_datasets)
    key = run_key(train_opts, test_opts, seed, threads)
    if (unit := cache.get(path, key)) is not None:
        return unit
    tic = time.perf_counter()
    ckpt, summary = _train(cache, method, bits, seed, name, key, train_opts, source)
    train_seconds = time.perf_counter() - tic
    tic = time.perf_counter()
    scores = run_test(replace(test_opts, network_g=train_opts.network_g, num_threads=threads, reference=None,
                              path=replace(test_opts.path, pretrain_network_g=str(ckpt))),
                      table.test_opt, f"scripts/reproduce.py cell {cell} seed {seed}")
    return cache.put(path, {
        "cell": cell, "method": method, "bits": bits, "seed": seed, "key": key, "threads": threads,
        "options": source, "checkpoint": str(ckpt), "train_seconds": train_seconds,
        "method_seconds": summary["seconds"], "score_seconds": time.perf_counter() - tic,
        "val_psnr": summary["val_psnr"], "val_psnr_iter0": summary["val_psnr_iter0"],
        "fp_val_psnr": summary["fp_val_psnr"], "scores": _scores(scores), **describe(train_opts)})


def _run_reference(table: TableOptions, cache: Cache, method: str, seed: int, threads: int) -> Dict[str, Any]:
    """FP, bicubic, or the FP model with its long-skip branch zeroed; the last one is also scored on the
    calibration validation split (beside the FP model's score there), since that is what it is compared with."""
    name = f"{table.name}_{method}_s{seed}"
    path = cache.dir / method / f"s{seed}.json"
    opts = _test_options(table, name)
    train_opts = None
    if method == "Bicubic":
        opts = replace(opts, network_g={"type": "Bicubic", "upscale": opts.scale},
                       path=replace(opts.path, pretrain_network_g=None), reference=None)
    elif method == "FP_body_off":
        opts = replace(opts, zero_outputs=[table.body_off], reference=None)
        train_opts = replace(from_dict(TrainOptions, load_yaml(table.train_opt), f"{table.train_opt}:"),
                             name=name, manual_seed=seed, num_threads=threads)
    key = run_key(train_opts, opts, seed, threads)
    if (unit := cache.get(path, key)) is not None:
        return unit
    tic = time.perf_counter()
    scores = run_test(replace(opts, num_threads=threads), table.test_opt, f"scripts/reproduce.py cell {method}")
    unit = {"cell": method, "method": method, "bits": 32, "seed": seed, "key": key,
            "threads": threads, "train_seconds": 0.0, "scores": _scores(scores)}
    if train_opts is not None:
        ctx = validation_context(train_opts, table.train_opt, cache.dir, log)
        fp_val = validation_psnr(ctx.fp_model, ctx)
        val = validation_psnr(zero_outputs(ctx.fp_model, [table.body_off], f"{table.name} body_off"), ctx)
        unit.update(val_psnr=val, val_psnr_iter0=val, fp_val_psnr=fp_val)
    return cache.put(path, {**unit, "score_seconds": time.perf_counter() - tic})


def describe(opts: TrainOptions) -> Dict[str, Any]:
    """What a reader needs beside the numbers: weight granularity, whether every quantized product runs on
    integer operands (``deployable``: uniform grids only; dual-region, log√2 and twin grids have no integer kernel,
    and CompSRT's in-quantizer rotations de-rotate before the product),
    the levels per quantizer, and the training budget and variant."""
    from condiquant.quant.dual_region import region_points

    q = opts.quant
    if q.a_quantizer == "dual_region":
        dense, tail = region_points(q.a_bit, q.dual_region.levels)
        act_levels = dense + 2 * tail
    else:
        act_levels = 2 ** q.a_bit
    deployable = (q.a_quantizer == "uniform" and q.softmax_quantizer == "uniform" and q.post_act_quantizer == "uniform"
                  and not q.hadamard)
    info: Dict[str, Any] = {"w_granularity": q.w_granularity, "deployable": deployable,
                            "levels": {"weights": 2 ** q.w_bit, "activations": act_levels}}
    recon = opts.method in ("adaround", "brecq", "qdrop")
    loop = (opts.saft if opts.method in ("oaq", "condiquant_oaq") else opts.recon if recon
            else opts.pac if opts.method == "dbdc_pac" else opts.dqc if opts.method not in UNTRAINED else None)
    if recon:  # updates per reconstruction unit, on cached crops
        r = opts.recon
        info["budget"] = {"updates_per_unit": r.iters_per_block, "batch": r.batch_size, "patch": r.patch_size,
                          "cached_crops": r.num_patches}
    elif loop is not None:
        info["budget"] = {"updates": loop.total_iter, "batch": loop.batch_size, "patch": loop.patch_size}
    if loop is not None:
        info["loop"] = {"lr": loop.lr, "lr_scale": loop.lr_scale, "warmup_iter": loop.warmup_iter,
                        "ema_decay": loop.ema_decay, "select": loop.select}
    return info


def median_seed(units: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the median validation PSNR (the lower middle one for an even count)."""
    ordered = sorted(units, key=lambda u: (u["val_psnr"], u["seed"]))
    return ordered[(len(ordered) - 1) // 2]


def run_rest(table: TableOptions, cache: Cache, unit: Dict[str, Any]) -> Dict[str, Any]:
    """Score the median seed's checkpoint on the datasets the seeds were not scored on."""
    rest = [d for d in (table.datasets or []) if d not in table.seed_datasets]
    name = f"{table.name}_{unit['cell']}_s{unit['seed']}"
    path = cache.dir / unit["cell"] / "rest.json"
    test_opts = _test_options(table, name + "_rest", rest)
    key = hashlib.sha256(f"{unit['key']}|{run_key(None, test_opts, unit['seed'], unit['threads'])}".encode()
                         ).hexdigest()[:16]
    if (cached := cache.get(path, key)) is not None:
        return cached
    train_opts, source = cell_train_options(table, unit["method"], unit["bits"], name, unit["seed"])
    train_opts = replace(train_opts, num_threads=unit["threads"])
    ckpt = Path(unit["checkpoint"])
    if not ckpt.is_file():  # experiments/ is not committed: a fresh clone retrains the seed (same key)
        ckpt, _ = _train(cache, unit["method"], unit["bits"], unit["seed"], name, unit["key"], train_opts, source)
    tic = time.perf_counter()
    scores = run_test(replace(test_opts, network_g=train_opts.network_g, num_threads=unit["threads"],
                              reference=None, path=replace(test_opts.path, pretrain_network_g=str(ckpt))),
                      table.test_opt, f"scripts/reproduce.py cell {unit['cell']} seed {unit['seed']} (rest)")
    return cache.put(path, {"cell": unit["cell"], "seed": unit["seed"], "key": key, "seed_key": unit["key"],
                            "score_seconds": time.perf_counter() - tic, "scores": _scores(scores)})


def seeds_of(table: TableOptions, method: str, units: List[Dict[str, Any]]) -> List[int]:
    variant = table.variants.get(method, VariantOptions(method))
    if method in REFERENCE or variant.method in UNTRAINED:
        return table.seeds[:1]
    seeds = variant.seeds or table.seeds
    if len(units) >= 2 and float(np.std([u["val_psnr"] for u in units], ddof=1)) > table.std_threshold:
        return seeds + [s for s in table.extra_seeds if s not in seeds]
    return list(seeds)


def run_cell(table: TableOptions, cache: Cache, method: str, bits: int) -> Dict[str, Any]:
    units: List[Dict[str, Any]] = []
    todo = seeds_of(table, method, units)
    while len(units) < len(todo):
        units.append(run_seed(table, cache, method, bits, todo[len(units)]))
        todo = seeds_of(table, method, units)
    rest = None
    if method not in REFERENCE:
        rest = run_rest(table, cache, median_seed(units))
    return aggregate(table, method, bits, units, rest)


def aggregate(table: TableOptions, method: str, bits: int, units: List[Dict[str, Any]],
              rest: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The table row of a cell: mean ± std over seeds where there are seeds, single scores elsewhere."""
    row: Dict[str, Any] = {"cell": units[0]["cell"], "method": method, "bits": bits,
                           "seeds": [u["seed"] for u in units], "keys": [u["key"] for u in units],
                           "commits": sorted({u["commit"] for u in units} | ({rest["commit"]} if rest else set())),
                           "codes": sorted({u["code"] for u in units} | ({rest["code"]} if rest else set())),
                           "threads": units[0]["threads"],
                           "train_seconds": float(np.mean([u["train_seconds"] for u in units])),
                           "score_seconds": float(sum(u["score_seconds"] for u in units)
                                                  + (rest["score_seconds"] if rest else 0.0))}
    variant = table.variants.get(method, VariantOptions(method))
    row["variant_method"] = variant.method
    for k in ("w_granularity", "deployable", "levels", "budget", "loop"):
        if k in units[0]:
            row[k] = units[0][k]
    if "val_psnr" in units[0]:
        vals = [u["val_psnr"] for u in units]
        row.update(val_psnr_mean=float(np.mean(vals)), val_psnr_std=float(np.std(vals, ddof=1)) if len(vals) > 1
                   else 0.0, val_psnr_iter0=float(np.mean([u["val_psnr_iter0"] for u in units])),
                   val_psnr=vals, fp_val_psnr=units[0]["fp_val_psnr"])
    scores: Dict[str, Dict[str, Any]] = {}
    for name in units[0]["scores"]:
        psnrs = [u["scores"][name]["psnr"] for u in units]
        scores[name] = {"psnr_mean": float(np.mean(psnrs)), "ssim_mean": float(np.mean(
            [u["scores"][name]["ssim"] for u in units])), "psnr": psnrs}
        if len(psnrs) > 1:
            scores[name]["psnr_std"] = float(np.std(psnrs, ddof=1))
    if rest is not None:
        row["rest_seed"] = rest["seed"]
        for name, s in rest["scores"].items():
            scores[name] = {"psnr_mean": s["psnr"], "ssim_mean": s["ssim"], "seed": rest["seed"]}
    order = table.datasets or list(scores)
    row["scores"] = {n: scores[n] for n in order if n in scores}
    return row


def cells(table: TableOptions) -> List[tuple]:
    grid = [("FP", 32)] if table.include_fp else []
    grid += [("Bicubic", 32)] if table.include_bicubic else []
    grid += [("FP_body_off", 32)] if table.body_off else []
    return grid + [(m, b) for b in table.bits for m in table.methods
                   if m not in table.variants or table.variants[m].bits is None or b in table.variants[m].bits]


def load_paper(key: str | None) -> Dict[str, Any]:
    if not key:
        return {}
    return yaml.safe_load((Path(__file__).with_name("paper_tables.yml")).read_text()).get(key, {})


def _pm(mean: float, std: Optional[float]) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def render(table: TableOptions, rows: List[Dict[str, Any]], command: str, cache: Cache) -> str:
    names = table.datasets or (list(rows[0]["scores"]) if rows else [])
    paper = load_paper(table.paper)
    commits = sorted({c for r in rows for c in r["commits"]})
    codes = sorted({c for r in rows for c in r["codes"]})
    lines = [f"# {table.name}", "",
             f"Produced by `{command}` (train options `{table.train_opt}`, test options `{table.test_opt}`).",
             f"PSNR (dB) on Y; `mean ± std` over the row's seeds (sample std). Seeds: {table.seeds} per trained row "
             f"({table.seeds + table.extra_seeds} where the validation std exceeds {table.std_threshold} dB); "
             f"untrained rows and FP/bicubic: seed {table.seeds[0]}. Each seed is scored on the calibration "
             f"validation split (`val`) and on {', '.join(table.seed_datasets)}; "
             f"{', '.join(n for n in names if n not in table.seed_datasets)} are scored once, on the checkpoint of "
             f"the seed with the median validation PSNR. `val it0`: validation PSNR before training (mean). "
             f"Threads per run: {rows[0]['threads'] if rows else '?'}."
             + (" Columns marked *paper* are published numbers, not ours"
                + (f" ({paper.get('source')})" if paper else "") + "." if paper else "")
             + (f" `FP_body_off`: the FP model with the output of `{table.body_off}` (the long skip's residual "
                f"branch) zeroed, i.e. with no body at all: the floor a quantized body has to beat; its `val` is "
                f"scored like the trained rows'." if table.body_off else ""),
             f"Cells from commits {', '.join(commits)} (package code {', '.join(codes)}; today's code "
             f"{cache.code})."]
    for b in {id(b): b for c in codes for b in cache.chain(c) or []}.values():  # every link a cell stands on
        lines.append(f"- code {b['from_code']} bridged to {b['to_code']} by `{b['command']}`: "
                     + ", ".join(f"{c['cell']} s{c['seed']} {c['diff']:+.3f} dB (tol {c['tol']:.3f})"
                                 for c in b["checked"]))
    for label, v in table.variants.items():
        lines.append(f"- row `{label}`: method `{v.method}`, options `{v.train_opt or table.train_opt}`"
                     + "".join(f", `{k}={json.dumps(x)}`" for k, x in v.overrides.items()) + ".")
    if table.train_overrides:
        lines.append("- every row: " + ", ".join(f"`{k}={json.dumps(x)}`" for k, x in table.train_overrides.items()))
    lines.append("")
    header = ("| method | bits | deployable | seeds | val | val it0 | " + " | ".join(names)
              + (" | " + " | ".join(f"{n} *paper*" for n in names) if paper else "") + " | train s | score s |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        val = _pm(r["val_psnr_mean"], r["val_psnr_std"] if len(r["seeds"]) > 1 else None) if "val_psnr_mean" in r \
            else "–"
        it0 = f"{r['val_psnr_iter0']:.2f}" if "val_psnr_iter0" in r else "–"
        ours = " | ".join(_pm(r["scores"][n]["psnr_mean"], r["scores"][n].get("psnr_std")) if n in r["scores"]
                          else "…" for n in names)
        dep = {True: "yes", False: "no"}.get(r.get("deployable"), "–")
        row = f"| {r['method']} | {r['bits']} | {dep} | {len(r['seeds'])} | {val} | {it0} | {ours}"
        if paper:
            cell = paper.get("rows", {}).get(r["cell"], {})
            row += " | " + " | ".join(cell.get(n, "–") for n in names)
        lines.append(row + f" | {r['train_seconds']:.0f} | {r['score_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _write(table: TableOptions, rows: List[Dict[str, Any]], command: str, cache: Cache,
           pending: Sequence[str] = ()) -> Path:
    md = Path("results") / f"{table.name}.md"
    text = render(table, rows, command, cache)
    if pending:
        text += f"\nPending (not yet computed): {', '.join(pending)}.\n"
    atomic_write_text(md, text)
    atomic_write_text(Path("results") / f"{table.name}.json", json.dumps(
        {"command": command, "code": cache.code, "commit": cache.commit, "seeds": table.seeds,
         "rows": rows, "pending": list(pending)}, indent=1))
    return md


def run_table(opt_path: str, overrides: List[str], command: str, cached: bool = False) -> Path:
    """Compute (or reuse) every cell and write the table; ``cached``: compute nothing, write the cells whose runs
    are all cached and list the others as pending."""
    table = load_table(opt_path, overrides)
    out_dir = Path("results") / table.name
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Cache(out_dir, readonly=cached)
    # One log for the whole table (appended across resumed runs), beside the per-run logs.
    handler = logging.FileHandler(Path("results") / f"{table.name}.log")
    handler.setFormatter(LOG_FORMAT)
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # before the first run's logger setup, or this line is dropped
    log.info("table %s: %s (code %s, commit %s)", table.name, command, cache.code, cache.commit)
    rows: List[Dict[str, Any]] = []
    pending: List[str] = []
    try:
        for method, bits in cells(table):
            tic = time.perf_counter()
            try:
                rows.append(run_cell(table, cache, method, bits))
            except Missing:
                pending.append(_cell_id(method, bits))
                continue
            log.info("cell %s ready (%.0f s)", rows[-1]["cell"], time.perf_counter() - tic)
            if not cached:
                _write(table, rows, command, cache)
    finally:
        log.removeHandler(handler)
        handler.close()
    return _write(table, rows, command, cache, pending)


def next_bridge(cache: Cache, codes: List[str]) -> Optional[str]:
    """The code fingerprint to check first: one that no chain of bridges leads to today's from and whose bridge would
    let the most runs stand (its own and those of codes already bridged to it); None if every run stands."""
    open_codes = [c for c in codes if not cache.bridged(c)]
    if not open_codes:
        return None
    return max(sorted(set(open_codes)), key=lambda c: sum(cache.chain(x, c) is not None for x in open_codes))


def check(opt_path: str, overrides: List[str], n: int, command: str, seed: Optional[int] = None) -> Dict[str, Any]:
    """Re-run ``n`` random cached trained runs on today's code and compare them with their cached numbers; a code
    fingerprint all of whose re-runs (at least two) agreed within max(cell std, 0.02 dB) is bridged to today's."""
    table = load_table(opt_path, overrides)
    out_dir = Path("results") / table.name
    cache = Cache(out_dir)
    units = [json.loads(p.read_text()) for p in sorted(cache.dir.glob("*/s*.json"))]
    units = [u for u in units if "val_psnr" in u and u["method"] not in REFERENCE]
    if not units:
        raise SystemExit(f"{out_dir}: no cached trained run to check")
    common = next_bridge(cache, [u["code"] for u in units])
    older = [u for u in units if u["code"] == common]
    pool = older if len(older) >= n else units
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    results = []
    for u in picked:
        siblings = [x["val_psnr"] for x in units if x["cell"] == u["cell"]]
        tol = max(float(np.std(siblings, ddof=1)) if len(siblings) > 1 else 0.0, 0.02)
        label = next(m for m in table.methods if _cell_id(m, u["bits"]) == u["cell"])
        name = f"{table.name}_{u['cell']}_s{u['seed']}_check"
        train_opts, source = cell_train_options(table, label, u["bits"], name, u["seed"])
        train_opts = replace(train_opts, num_threads=u["threads"])
        test_opts = _test_options(table, name, table.seed_datasets)
        if run_key(train_opts, test_opts, u["seed"], u["threads"]) != u["key"]:
            results.append({"cell": u["cell"], "seed": u["seed"], "from_code": u["code"], "ok": False,
                            "diff": float("nan"), "tol": tol, "note": "options changed since: key differs"})
            continue
        run_train(train_opts, source, command)
        summary = json.loads((Path("experiments") / name / "summary.json").read_text())
        diff = summary["val_psnr"] - u["val_psnr"]
        results.append({"cell": u["cell"], "seed": u["seed"], "from_code": u["code"], "old": u["val_psnr"],
                        "new": summary["val_psnr"], "diff": diff, "tol": tol, "ok": abs(diff) <= tol})
        log.info("check %s seed %d: cached %.3f, today %.3f (diff %+.3f, tol %.3f)", u["cell"], u["seed"],
                 u["val_psnr"], summary["val_psnr"], diff, tol)
    for code in sorted({r["from_code"] for r in results}):
        checked = [r for r in results if r["from_code"] == code]
        if code != cache.code and len(checked) >= 2:  # one re-run is a spot check (the report below), no bridge
            cache.bridges.append({"from_code": code, "to_code": cache.code, "commit": cache.commit,
                                  "command": command, "checked": checked, "ok": all(r["ok"] for r in checked)})
    atomic_write_text(cache.bridges_path, json.dumps(cache.bridges, indent=1))
    report = {"command": command, "code": cache.code, "commit": cache.commit, "checked": results,
              "agree": all(r["ok"] for r in results)}
    atomic_write_text(out_dir.parent / f"{table.name}_check.json", json.dumps(report, indent=1))
    return report
