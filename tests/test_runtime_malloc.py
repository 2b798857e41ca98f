"""keep_freed_memory: a freed large tensor's memory is reused, not taken from the OS again page by page."""
from __future__ import annotations

import resource
import sys

import pytest
import torch

from condiquant.config import ConfigError
from condiquant.runtime import keep_freed_memory


def _faults_of_a_64mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2 ** 24).fill_(1.0)  # 64 MiB, written (touched) and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensor_memory_is_reused_without_page_faults():
    assert keep_freed_memory()
    _faults_of_a_64mb_tensor()  # the heap grows once
    assert _faults_of_a_64mb_tensor() < 100  # fresh from the OS it would be 16384 (one per 4 KiB page)


def test_unknown_malloc_choice_is_refused(monkeypatch):
    monkeypatch.setenv("CONDIQUANT_MALLOC", "jemalloc")
    with pytest.raises(ConfigError, match="CONDIQUANT_MALLOC: 'jemalloc'"):
        keep_freed_memory()
    monkeypatch.setenv("CONDIQUANT_MALLOC", "default")
    assert keep_freed_memory() is False
