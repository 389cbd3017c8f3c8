"""The devices a command can be told to run on, and the one rule that picks one."""

from __future__ import annotations

from typing import Final

import torch

from cadis.errors import CadisError

DEVICES: Final = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA where there is a device, else the CPU; ``cuda`` without one is an error."""
    if name not in DEVICES:
        raise CadisError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CadisError("device cuda requested but no CUDA device is available")
    return torch.device(name)
