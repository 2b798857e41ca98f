"""What every PTQ method receives: the FP model, options, calibration data, output folder, logger."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn

from condiquant.data.calib import CalibrationImages
from condiquant.options import QuantOptions, TrainOptions
from condiquant.quant.attach import attach_quantizers
from condiquant.quant.calibrate import ObserverSpec, init_bounds, init_weight_bounds
from condiquant.transforms.bias_correction import correct_biases


@dataclass
class PTQContext:
    opts: TrainOptions
    quant: QuantOptions  # placement resolved for the arch
    fp_model: nn.Module  # never modified: the teacher
    calib: CalibrationImages
    exp_dir: Path
    logger: logging.Logger
    device: torch.device
    resume: Optional[Path] = None  # a training state to continue from
    summary: Dict[str, Any] = field(default_factory=dict)  # what the method reports into summary.json

    @property
    def input_range(self) -> float:
        return float(getattr(self.fp_model, "input_range", 1.0))

    def quantized_copy(self) -> nn.Module:
        return self.quantize(copy.deepcopy(self.fp_model))

    def quantize(self, model: nn.Module) -> nn.Module:
        """Attach quantizers to ``model`` (an FP model, possibly transformed) in place; returns it."""
        names = attach_quantizers(model, self.quant)
        if not names:
            raise ValueError("quant.placement matched no module: nothing would be quantized")
        self.logger.info("quantized %d modules (%s ... %s)", len(names), names[0], names[-1])
        return model

    def calibration_batches(self) -> list:
        """The seeded bound-initialisation crops, in chunks."""
        c = self.opts.calib
        crops = self.calib.random_crops(c.num_patches, c.patch_size, np.random.default_rng(c.seed))
        return [chunk.to(self.device) for chunk in crops.split(c.chunk_size)]

    def init_bounds(self, model: nn.Module, observer: str) -> None:
        b = self.opts.bound_init
        spec = ObserverSpec(observer, b.percentile, b.dobi_steps, b.max_samples, self.opts.calib.seed,
                            b.density_ratio, b.density_ratio_8bit)
        n = init_bounds(model, self.calibration_batches(), spec, self.quant.placement.one_direction,
                        self.input_range)
        self.logger.info("initialised %d quantizers with %s", n, observer)

    def init_weight_bounds(self, model: nn.Module, modules: Optional[Iterable[str]] = None) -> None:
        """Refit the weight bounds (of ``modules``, or all) with DOBI after a pass changed the weights."""
        b = self.opts.bound_init
        spec = ObserverSpec("dobi", b.percentile, b.dobi_steps, b.max_samples, self.opts.calib.seed)
        init_weight_bounds(model, spec, self.quant.placement.one_direction, modules)

    def correct_biases(self, model: nn.Module) -> None:
        """``bound_init.bias_correction``: once every bound is set, the layers' biases absorb the mean output shift
        of their weight quantization, measured on the bound-initialisation crops (``transforms/bias_correction.py``)."""
        if not self.opts.bound_init.bias_correction:
            return
        shifts = correct_biases(model, self.calibration_batches(), self.input_range)
        self.logger.info("bias correction: %d layers, largest bias shift %.4g", len(shifts),
                         max(shifts.values(), default=0.0))
        self.summary["bias_correction_layers"] = len(shifts)
