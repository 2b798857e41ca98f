"""Module-name patterns: ``*`` matches within one dotted component, ``**`` across components.

``layers.*`` is exactly the RSTBs ``layers.0`` .. ``layers.3``; ``layers.**`` is everything under them.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(_compile(p).fullmatch(name) for p in patterns)
