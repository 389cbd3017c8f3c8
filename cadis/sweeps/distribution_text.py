"""A searched key's distribution as text, both ways: how the sweep's parent run logs it (the
param ``search.<key>``, ``uniform [0.5, 4.0]``) and how the figures read it back. Written
and read here only, so the two cannot drift; torch-free, so reading a sweep back stays light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Sequence

#: The distributions drawn between two bounds (``int`` includes both).
RANGE_KINDS: Final = ("uniform", "loguniform", "int")
#: What :func:`describe_distribution` writes of a range.
RANGE_PATTERN: Final = re.compile(r"(uniform|loguniform|int) \[([^,\]]+), ([^\]]+)\]")
#: The kind a description too short to name one reads as.
DEFAULT_KIND: Final = "choice"


@dataclass(frozen=True)
class SearchRange:
    """A distribution as read back: its kind and, for ranges, the bounds (a choice's
    options are taken from the values the trials ran)."""

    kind: str
    low: float | None = None
    high: float | None = None


def describe_distribution(kind: str, values: Sequence[Any]) -> str:
    """``uniform [0.5, 4.0]``, ``int [1, 4] (both included)``, ``choice [2, 4, 8]``,
    ``grid [{finetune: lora, lora_rank: 4}, {finetune: full}]``."""
    if kind in RANGE_KINDS:
        low, high = values
        included = " (both included)" if kind == "int" else ""
        return f"{kind} [{low}, {high}]{included}"
    return f"{kind} [{', '.join(_format_value(value) for value in values)}]"


def read_description(text: str) -> SearchRange:
    """The :class:`SearchRange` of a text :func:`describe_distribution` wrote."""
    match = RANGE_PATTERN.match(text)
    if match is None:
        return SearchRange(text.split(" ", 1)[0] or DEFAULT_KIND)
    return SearchRange(match.group(1), float(match.group(2)), float(match.group(3)))


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {item}" for key, item in value.items()) + "}"
    return str(value)
