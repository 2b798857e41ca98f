"""One module per PTQ method; ``METHODS`` maps the YAML ``method:`` value to its entry point."""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from condiquant.methods import (baselines, compsrt, condiquant, dbdc_pac, noisyquant, oaq, ptq4vit, recon, repq,
                                twodquant)
from condiquant.methods.context import PTQContext

METHODS: Dict[str, Callable[[PTQContext], nn.Module]] = {
    "minmax": baselines.minmax,
    "percentile": baselines.percentile,
    "dobi": baselines.dobi,
    "2dquant": twodquant.run,
    "condiquant": condiquant.run,
    "oaq": oaq.run,
    "condiquant_oaq": oaq.run_conditioned,
    "noisyquant": noisyquant.run,
    "adaround": recon.adaround,
    "brecq": recon.brecq,
    "qdrop": recon.qdrop,
    "repq": repq.run,
    "dbdc_pac": dbdc_pac.run,
    "ptq4vit": ptq4vit.run,
    "compsrt": compsrt.run,
}
