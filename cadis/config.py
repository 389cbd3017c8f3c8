"""Parsing of ``key=value`` overrides, shared by every command that takes ``--set``."""

from __future__ import annotations

import math
import numbers
from typing import Any

import yaml

from cadis.errors import CadisError


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as YAML (numbers, booleans, lists, mappings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise CadisError(f"--set takes key=value, got {item!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CadisError(f"--set {key}: cannot parse value {raw!r}") from None


def coerce_like(key: str, value: Any, current: Any) -> Any:
    """Convert ``value`` to the type of the setting's current value, or raise naming the key.

    YAML reads ``3e-3`` as a string and ``1`` as an int where a float is meant; numbers given as
    strings are converted here so that one place decides what a setting's type is.
    """
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        raise CadisError(f"{key} must be true or false, got {value!r}")
    if isinstance(current, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CadisError(f"{key} must be a number, got {value!r}") from None
        if isinstance(current, int):
            if not number.is_integer():
                raise CadisError(f"{key} must be an integer, got {value!r}")
            return int(number)
        return number
    if isinstance(current, str) and not isinstance(value, str):
        raise CadisError(f"{key} must be a string, got {value!r}")
    if isinstance(current, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise CadisError(f"{key} must be a list, got {value!r}")
    if isinstance(current, dict) and not isinstance(value, dict):
        raise CadisError(f"{key} must be a mapping, got {value!r}")
    return value


def is_real(value: object) -> bool:
    """A real number that is not a bool (``lambda: true`` in a sweep file is a typo, not 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(value: object, key: str) -> int:
    """``value`` as an int >= 1, or :class:`CadisError` naming ``key``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise CadisError(f"{key} must be an integer >= 1, got {value!r}")


def non_negative_float(value: object, key: str) -> float:
    """``value`` as a finite float >= 0, or :class:`CadisError` naming ``key``."""
    if is_real(value) and math.isfinite(float(value)) and float(value) >= 0.0:
        return float(value)
    raise CadisError(f"{key} must be a finite number >= 0, got {value!r}")
