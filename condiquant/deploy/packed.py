"""Packed low-bit checkpoints: quantized weights stored as b-bit integer codes, bit-packed, everything else FP32.

File layout (``.cqpack``)::

    b"CQPACK1\\n" | uint32 header length | zlib(JSON header) | data

The header holds the arch (``network_g``), the resolved quant options and, per tensor, its name, shape and byte
range in ``data``. A quantized weight (one entry per weight quantizer: a Linear split into q/k/v has three) is
stored as its quantizer's ``lower`` and ``upper`` (FP32, one pair per tensor or per output channel) followed by
the codes r = round((clip(w, l, u) - l) / s), s = (u - l) / (2^b - 1), packed b bits each, little-endian.
Unpacking computes r * s + l in FP32, exactly what the fake quantizer outputs, so the loaded model's outputs are
bit-identical to the fake-quant checkpoint's. Buffers that building the network recreates exactly (attention masks,
position indices, fixed mean shifts) are not stored. Sizes: ``theoretical_bits`` is 32 (P - Q) + b Q plus 64 bits
per scale pair (P: every floating-point tensor element stored, Q: the quantized weights).
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn as nn

from condiquant.archs import build_network
from condiquant.config import ConfigError, from_dict, to_dict
from condiquant.engine.state import atomic_write_bytes
from condiquant.options import QuantOptions
from condiquant.quant.attach import attach_quantizers, weight_quantizer_inputs
from condiquant.transforms.rotation import restore_rotations

MAGIC = b"CQPACK1\n"


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """uint8 codes < 2^bits -> ceil(n * bits / 8) bytes (bit i of code k at stream bit k * bits + i)."""
    planes = (codes.reshape(-1, 1) >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=n * bits, bitorder="little").reshape(n, bits)
    return (planes.astype(np.uint16) << np.arange(bits, dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def _codes(w: torch.Tensor, q) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, lower, scale) of weight slice ``w`` on quantizer ``q``'s grid, broadcast like the quantizer does."""
    lower, upper = q._broadcast(q.lower, w).detach(), q._broadcast(q.upper, w).detach()
    levels = 2 ** q.n_bits - 1
    width = torch.clamp(upper - lower, min=1e-8)
    scale = width / levels
    codes = torch.round((torch.minimum(torch.maximum(w.detach(), lower), lower + width) - lower) / scale)
    return codes, lower, scale


@dataclass
class PackedSize:
    file_bytes: int
    theoretical_bits: int
    params: int  # P
    quantized: int  # Q

    @property
    def theoretical_bytes(self) -> float:
        return self.theoretical_bits / 8

    @property
    def overhead(self) -> float:
        return self.file_bytes / self.theoretical_bytes - 1


def save_packed(path: Path, model: nn.Module, network_g: Dict[str, Any], quant: QuantOptions) -> PackedSize:
    """Write the quantized ``model`` (quantizers attached and initialised) as a packed file."""
    if quant.hadamard:
        raise ConfigError("quant.hadamard: CompSRT's in-quantizer rotations leave no integer weight codes to pack")
    sd = model.state_dict()
    entries: List[Dict[str, Any]] = []
    blobs: List[bytes] = []
    offset = 0
    packed_weights = set()
    bits_total, params, quantized = 0, 0, 0

    def add(entry: Dict[str, Any], blob: bytes) -> None:
        nonlocal offset
        entries.append({**entry, "offset": offset, "nbytes": len(blob)})
        blobs.append(blob)
        offset += len(blob)

    for name, q, w in weight_quantizer_inputs(model):
        module_name = name.rsplit(".weight_quantizers.", 1)[0]
        index = int(name.rsplit(".", 1)[1])
        codes, _, _ = _codes(w, q)
        bounds = torch.stack([q.lower.detach().reshape(-1), q.upper.detach().reshape(-1)]).float().numpy()
        blob = bounds.astype("<f4").tobytes() + pack_codes(codes.to(torch.uint8).numpy(), q.n_bits)
        add({"name": f"{module_name}.weight", "kind": "packed", "chunk": index, "shape": list(w.shape),
             "bits": q.n_bits, "channels": int(q.lower.numel())}, blob)
        packed_weights |= {f"{module_name}.weight", f"{name}.lower", f"{name}.upper"}
        bits_total += q.n_bits * w.numel() + 64 * q.lower.numel()
        quantized += w.numel()
    # buffers the loader's fresh build makes by itself (SwinIR's attention masks and position indices, EMT's
    # mean shifts): not stored
    derived = {n: b for n, b in build_network(network_g).named_buffers()}
    for name, t in sd.items():
        if name in packed_weights or (name in derived and derived[name].shape == t.shape
                                      and torch.equal(derived[name], t.detach().cpu())):
            continue
        if t.is_floating_point():
            add({"name": name, "kind": "fp", "shape": list(t.shape), "dtype": "f4"},
                t.detach().float().contiguous().numpy().astype("<f4").tobytes())
            bits_total += 32 * t.numel()
            params += t.numel()
        else:  # integer / bool buffers (e.g. the quantizers' 'initialized' flags): exact, tiny
            arr = t.detach().cpu().numpy()
            add({"name": name, "kind": "raw", "shape": list(t.shape), "dtype": arr.dtype.str}, arr.tobytes())
    header = zlib.compress(json.dumps({"network_g": dict(network_g), "quant": to_dict(quant), "tensors": entries},
                                      separators=(",", ":")).encode(), 9)
    data = MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)
    atomic_write_bytes(path, data)
    return PackedSize(len(data), bits_total, params + quantized, quantized)


def load_packed(path: Path, network_g: Dict[str, Any] | None = None, where: str = "network_g") -> nn.Module:
    """Rebuild the quantized model of a packed file (weights dequantized from their codes)."""
    raw = Path(path).read_bytes()
    if not raw.startswith(MAGIC):
        raise ConfigError(f"{path}: not a condiquant packed checkpoint")
    (n,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    header = json.loads(zlib.decompress(raw[start:start + n]))
    data = memoryview(raw)[start + n:]
    if network_g is not None and dict(network_g) != header["network_g"]:
        raise ConfigError(f"{where}: differs from the packed checkpoint {path} ({header['network_g']})")
    model = build_network(header["network_g"], where)
    restore_rotations(model, {e["name"]: e["shape"] for e in header["tensors"]})
    attach_quantizers(model, from_dict(QuantOptions, header["quant"], f"{path}: quant"))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    quantizers = {name: q for name, q, _ in weight_quantizer_inputs(model)}
    for e in header["tensors"]:
        blob = bytes(data[e["offset"]:e["offset"] + e["nbytes"]])
        if e["kind"] == "fp":
            sd[e["name"]] = torch.from_numpy(np.frombuffer(blob, "<f4").copy()).reshape(e["shape"])
        elif e["kind"] == "raw":
            sd[e["name"]] = torch.from_numpy(np.frombuffer(blob, np.dtype(e["dtype"])).copy()).reshape(e["shape"])
    for e in header["tensors"]:  # quantized chunks last: their bounds first, then the dequantized weight slices
        if e["kind"] != "packed":
            continue
        blob = bytes(data[e["offset"]:e["offset"] + e["nbytes"]])
        c = e["channels"]
        bounds = torch.from_numpy(np.frombuffer(blob[:8 * c], "<f4").copy()).reshape(2, c)
        module = e["name"][: -len(".weight")]
        qname = f"{module}.weight_quantizers.{e['chunk']}"
        q = quantizers[qname]
        lower, upper = bounds[0].reshape(q.upper.shape), bounds[1].reshape(q.upper.shape)
        q.set_bounds(lower, upper)
        for key, value in (("lower", lower), ("upper", upper)):
            if f"{qname}.{key}" in sd:  # a symmetric grid's lower bound follows its upper one (no entry)
                sd[f"{qname}.{key}"] = value
        numel = int(np.prod(e["shape"]))
        codes = torch.from_numpy(unpack_codes(blob[8 * c:], e["bits"], numel).astype(np.float32)).reshape(e["shape"])
        _, lower, scale = _codes(torch.zeros(e["shape"]), q)
        weight = sd[e["name"]]
        chunk = weight.shape[0] // len(model.get_submodule(module).weight_quantizers)
        weight[e["chunk"] * chunk:(e["chunk"] + 1) * chunk] = codes * scale + lower
    model.load_state_dict(sd)
    return model
