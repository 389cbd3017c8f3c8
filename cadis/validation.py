"""Validators of single values, shared by every layer: each names the key it checks.

One rule per kind of value (sigma, alpha, a count, a non-negative number), so that the config,
the denoiser and ``Smooth`` refuse exactly the same inputs with the same words.
"""

from __future__ import annotations

import math
import numbers

from cadis.errors import CadisError


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


def check_sigma(value: object, key: str = "sigma") -> float:
    """``value`` as a finite float > 0 (the noise level, in [0, 1] image units), or
    :class:`CadisError` naming ``key``: NaN, inf, 0 and booleans are refused."""
    if is_real(value) and math.isfinite(float(value)) and float(value) > 0.0:
        return float(value)
    raise CadisError(f"{key} must be > 0 and finite, got {value!r}")


def check_probability(value: object, key: str) -> float:
    """``value`` as a float strictly between 0 and 1 (a failure probability such as alpha)."""
    if is_real(value) and 0.0 < float(value) < 1.0:
        return float(value)
    raise CadisError(f"{key} must be a number strictly between 0 and 1, got {value!r}")
