"""Validators of single values, shared by every layer: one function per kind of value.

Each takes the value and the key it is read from, returns the value in its canonical type and
raises :class:`CadisError` with one line naming the key and what is allowed, so that the
config, the sweep file, the denoiser and ``Smooth`` refuse exactly the same inputs with the
same words. Values are checked here once, where they enter (a config, a sweep file, a command
line); the code below trusts them.

YAML 1.1, which PyYAML reads, takes ``1e-3`` (no dot) for a string: :func:`read_number` is the
one place that reads such text as the number it spells.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from cadis.errors import CadisError


def is_real(value: object) -> bool:
    """A real number that is not a bool (``lambda: true`` in a sweep file is a typo, not 1.0)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def read_number(value: object) -> float | None:
    """``value`` as a float if it is a real number or text that spells one (YAML reads
    ``1e-3`` as text), else None. Non-finite numbers are returned: the caller's rule decides."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if is_real(value) else None


def number(value: object, key: str) -> float:
    """``value`` as a finite float (numbers written as text too, see :func:`read_number`)."""
    read = read_number(value)
    if read is not None and math.isfinite(read):
        return read
    raise CadisError(f"{key} must be a number, got {value!r}")


def flag(value: object, key: str) -> bool:
    """``value`` as a bool: ``true`` or ``false``, nothing else (not 0 or 1, not "yes")."""
    if isinstance(value, bool):
        return value
    raise CadisError(f"{key} must be true or false, got {value!r}")


def integer(value: object, key: str) -> int:
    """``value`` as an int (not a bool, not a float that happens to be whole)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise CadisError(f"{key} must be an integer, got {value!r}")


def integer_at_least(value: object, key: str, least: int, meaning: str | None = None) -> int:
    """``value`` as an int >= ``least`` (not a bool); ``meaning``, what the count counts, is
    said in the message: ``num_classes must be an integer >= 2, got 1``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least:
        return int(value)
    what = f" ({meaning})" if meaning else ""
    raise CadisError(f"{key} must be an integer >= {least}{what}, got {value!r}")


def positive_int(value: object, key: str, meaning: str | None = None) -> int:
    """``value`` as an int >= 1. ``meaning`` (what the count counts) makes the key required
    and is said in the message: ``num_trials is required: an integer >= 1 (trials to run)``."""
    if value is None and meaning:
        raise CadisError(f"{key} is required: an integer >= 1 ({meaning})")
    if meaning:
        integer(value, key)
    return integer_at_least(value, key, 1, meaning)


def _finite(value: object) -> float | None:
    """``value`` as a float if it is a finite real number (not a bool), else None."""
    return float(value) if is_real(value) and math.isfinite(float(value)) else None


def non_negative_float(value: object, key: str) -> float:
    """``value`` as a finite float >= 0, or :class:`CadisError` naming ``key``."""
    read = _finite(value)
    if read is not None and read >= 0.0:
        return read
    raise CadisError(f"{key} must be a finite number >= 0, got {value!r}")


def positive_float_or_none(value: object, key: str) -> float | None:
    """``value`` as a finite float > 0, or None where the setting is off (null)."""
    read = _finite(value)
    if value is None or (read is not None and read > 0.0):
        return read
    raise CadisError(f"{key} must be a finite number > 0, or null (off), got {value!r}")


def number_in(value: object, key: str, low: float, high: float, ends: str = "[]",
              meaning: str | None = None) -> float:
    """``value`` as a finite float between ``low`` and ``high``, each end included where
    ``ends`` has a bracket there and excluded where a parenthesis (``"(]"``: low < value <=
    high); ``meaning`` is said in the message: ``drop_path must be a number in [0, 1)
    (0 = off), got 1.0``."""
    read = _finite(value)
    above = read is not None and (read >= low if ends[0] == "[" else read > low)
    if above and (read <= high if ends[1] == "]" else read < high):
        return read
    what = f" ({meaning})" if meaning else ""
    raise CadisError(f"{key} must be a number in {ends[0]}{low:g}, {high:g}{ends[1]}{what}, "
                     f"got {value!r}")


def check_sigma(value: object, key: str = "sigma") -> float:
    """``value`` as a finite float > 0 (the noise level, in [0, 1] image units), or
    :class:`CadisError` naming ``key``: NaN, inf, 0 and booleans are refused."""
    read = _finite(value)
    if read is not None and read > 0.0:
        return read
    raise CadisError(f"{key} must be > 0 and finite, got {value!r}")


def check_sigmas(values: object, key: str) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of noise levels, each as :func:`check_sigma` takes it."""
    if not isinstance(values, (list, tuple)) or not values:
        raise CadisError(f"{key} must be a non-empty list of noise levels, got {values!r}")
    return tuple(check_sigma(value, key) for value in values)


def check_probability(value: object, key: str) -> float:
    """``value`` as a float strictly between 0 and 1 (a failure probability such as alpha)."""
    if is_real(value) and 0.0 < float(value) < 1.0:
        return float(value)
    raise CadisError(f"{key} must be a number strictly between 0 and 1, got {value!r}")


def choice(value: object, key: str, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed`` (a setting's fixed set of words)."""
    if value in allowed:
        return value  # type: ignore[return-value]
    raise CadisError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def known_name(value: object, kind: str, allowed: Sequence[str]) -> str:
    """``value`` if it names one of ``allowed`` (an entry of a registry: a dataset, a
    precision), else ``unknown KIND 'value'; allowed: ...``."""
    if value in allowed:
        return value  # type: ignore[return-value]
    raise CadisError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def direction(value: object, key: str) -> str:
    """``value`` if it is ``max`` or ``min``: which way a metric is better."""
    if value in ("max", "min"):
        return value  # type: ignore[return-value]
    raise CadisError(f"{key} must be max or min, got {value!r}")
