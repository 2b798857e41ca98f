"""Run an exported ONNX SR model in ONNX Runtime behind the ``nn.Module`` interface the scoring code uses."""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from condiquant.config import ConfigError


def session(path: Path, threads: int = 0, optimized: Path | None = None):
    """An ONNX Runtime CPU session with every graph optimisation (Q/DQ fusion into integer kernels) on."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimized_ops(path: Path) -> Dict[str, int]:
    """Op types (with counts) of the graph ONNX Runtime actually executes, after its optimisations."""
    import onnx

    target = path.with_suffix(".optimized.onnx")
    session(path, optimized=target)
    counts: Dict[str, int] = {}
    for node in onnx.load(str(target)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    target.unlink()
    return counts


def x86_without_vnni() -> bool:
    """An x86 CPU whose integer kernels in ONNX Runtime add pairs of u8 x s8 products in int16 (AVX2 without
    AVX-VNNI or AVX512-VNNI), which saturates when both operands use all 8 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


class OnnxSR(nn.Module):
    """``forward(lr)`` with lr in 0..1 (N, 3, H, W) of any size; a model exported at a fixed tile runs tile by
    tile (overlap ``overlap``, outputs averaged where tiles overlap; images smaller than a tile are padded by
    replication and cropped back)."""

    def __init__(self, path: str | Path, threads: int = 0, overlap: int = 16):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: ONNX model not found (scripts/export.py --format onnx)")
        self.session = session(path, threads)
        import onnx

        self.meta = meta = {p.key: json.loads(p.value)
                            for p in onnx.load(str(path), load_external_data=False).metadata_props}
        self.scale, self.tile = int(meta.get("scale", 0)), int(meta.get("tile", 0))
        if not self.scale:
            raise ConfigError(f"{path}: no 'scale' in the model's metadata (not exported by condiquant)")
        self.overlap = min(overlap, self.tile // 2) if self.tile else 0
        if meta.get("w_bits") == 8 and meta.get("a_bits") == 8 and x86_without_vnni():
            # measured: W8A8 integer convolutions differ from the fake-quant model there; W<=7 or A<=7 are exact
            logging.getLogger("condiquant").warning(
                "%s: 8-bit weights and activations on an x86 CPU without VNNI: ONNX Runtime's integer kernels can "
                "saturate in int16 here (outputs off by up to ~0.02); export 7-bit weights or activations for "
                "exact integer results on this CPU", path)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"lr": np.ascontiguousarray(x.numpy(), np.float32)})[0])

    def _run_tile(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        if h < self.tile or w < self.tile:
            x = nn.functional.pad(x, (0, self.tile - w if w < self.tile else 0, 0, self.tile - h if h < self.tile
                                      else 0), mode="replicate")
        return self._run(x)[:, :, : h * self.scale, : w * self.scale]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tile:
            return self._run(x)
        n, c, h, w = x.shape
        t, s = self.tile, self.scale
        stride = t - self.overlap
        rows: List[int] = sorted({*range(0, max(h - t, 0), stride), max(h - t, 0)})
        cols: List[int] = sorted({*range(0, max(w - t, 0), stride), max(w - t, 0)})
        out = x.new_zeros(n, c, h * s, w * s)
        weight = torch.zeros_like(out)
        for top in rows:
            for left in cols:
                sr = self._run_tile(x[:, :, top: top + t, left: left + t])
                ys, xs = slice(top * s, top * s + sr.shape[2]), slice(left * s, left * s + sr.shape[3])
                out[:, :, ys, xs] += sr
                weight[:, :, ys, xs] += 1
        return out / weight
