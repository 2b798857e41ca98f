"""Every shipped options file parses against its schema (a renamed key must not leave a file behind)."""
from __future__ import annotations

from pathlib import Path

import pytest

from condiquant.config import from_dict, load_yaml
from condiquant.options import TableOptions, TestOptions, TrainOptions

OPTIONS = Path(__file__).resolve().parents[1] / "options"


def schema_of(path: Path):
    if path.parent.name == "tables":
        return TableOptions
    data = load_yaml(path)
    return TrainOptions if "quant" in data else TestOptions


@pytest.mark.parametrize("path", sorted(OPTIONS.rglob("*.yml")), ids=lambda p: str(p.relative_to(OPTIONS)))
def test_options_file_parses(path):
    from_dict(schema_of(path), load_yaml(path), f"{path}:")
