"""The check every exact weight transform ends with: the network's output before and after, both in float64."""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def output_change(before: nn.Module, after: nn.Module, batches: Iterable[torch.Tensor], input_range: float) -> float:
    """||after(x) - before(x)|| / ||before(x)|| over ``batches`` (LR crops in 0..1), both networks in float64."""
    b64, a64 = copy.deepcopy(before).double(), copy.deepcopy(after).double()
    num = den = 0.0
    for x in batches:
        x = x.double() * input_range
        y0 = b64(x)
        num += float((a64(x) - y0).pow(2).sum())
        den += float(y0.pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


def check_exact(what: str, before: nn.Module, after: nn.Module, batches: Iterable[torch.Tensor],
                input_range: float, tol: float = 1e-6) -> float:
    """Raise if ``after`` does not compute what ``before`` does (relative change above ``tol``); returns it."""
    change = output_change(before, after, batches, input_range)
    if not change <= tol:
        raise RuntimeError(f"{what}: the transformed network's output moved by {change:.2e} (relative, float64), "
                           f"more than {tol:.0e}: the transform is not exact")
    return change
