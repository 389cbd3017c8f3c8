"""Parsing of ``key=value`` overrides, shared by every command that takes ``--set``."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import yaml

from cadis.errors import CadisError
from cadis.validation import flag, read_number


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as YAML (numbers, booleans, lists, mappings)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise CadisError(f"--set takes key=value, got {item!r}")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise CadisError(f"--set {key}: cannot parse value {raw!r}") from None


def parse_overrides(items: Sequence[str],
                    setting: Callable[[str], str] = lambda key: key) -> list[tuple[str, Any]]:
    """Every ``key=value`` item parsed by :func:`parse_override`, in order. A setting given
    twice is refused: which of its values was meant would be a guess. ``setting`` maps a key
    to the setting it writes, where two spellings write the same one (``lr``, ``base.lr``)."""
    parsed = [parse_override(item) for item in items]
    seen: dict[str, str] = {}
    for key, _ in parsed:
        name = setting(key)
        if name in seen:
            also = "" if seen[name] == key else f" (also as {seen[name]})"
            raise CadisError(f"--set {key}: given more than once{also}; give each key once")
        seen[name] = key
    return parsed


def coerce_like(key: str, value: Any, current: Any) -> Any:
    """Convert ``value`` to the type of the setting's current value, or raise naming the key.

    YAML reads ``1`` as an int where a float is meant, and ``3e-3`` as text
    (:func:`cadis.validation.read_number` reads it): one place decides what a setting's type is.
    """
    if current is None or value is None:
        return value
    if isinstance(current, bool):
        return flag(value, key)
    if isinstance(current, (int, float)):
        number = read_number(value)
        if number is None:
            raise CadisError(f"{key} must be a number, got {value!r}")
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
