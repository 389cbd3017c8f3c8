"""The arithmetic a base's certification forwards run in, and the check that it computes
what the fp32 eager base computes.

A lower-precision or compiled base is still a base: the certificate is exact for the function
it computes, whatever that is, because the noise is added in fp32 before the base sees it. What
changes is *which* function: so a figure says which precision made it, and before one is made
the fast base is compared with the fp32 eager one on real noisy draws of the images to be
certified (:func:`check_agreement`). Agreeing on at least :data:`MIN_AGREEMENT` of them is
what lets a figure of the fast base stand for the fp32 model's.

What it buys is measured in ``docs/performance.md`` (``benchmarks/certify_modes.py``): on the
default Fashion-MNIST pair, compiled fp32 agrees with eager on every check draw, while bf16,
faster still, disagrees on about 0.3% of them and is refused. Training steps stay fp32 eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor, nn

from cadis.errors import CadisError

#: The share of check draws on which the fast base must predict what fp32 eager predicts.
MIN_AGREEMENT: Final = 0.999
#: Noisy draws compared by :func:`check_agreement` (at 99.9 %, at most two may differ).
AGREEMENT_DRAWS: Final = 2000
#: Images those draws come from (the first ones certified), so one odd image cannot pass alone.
AGREEMENT_IMAGES: Final = 20


@dataclass(frozen=True)
class Precision:
    """A named arithmetic for forwards: ``autocast`` None runs in fp32."""

    name: str
    autocast: torch.dtype | None
    devices: tuple[str, ...]


#: The precisions certification forwards may run in, by name (``auto`` picks one per device).
PRECISIONS: Final = {
    "fp32": Precision("fp32", None, ("cpu", "cuda")),
    "bf16": Precision("bf16", torch.bfloat16, ("cpu", "cuda")),
    "fp16": Precision("fp16", torch.float16, ("cuda",)),
}
PRECISION_CHOICES: Final = ("auto", *PRECISIONS)
FP32: Final = PRECISIONS["fp32"]


def resolve_precision(name: str, device: torch.device) -> Precision:
    """The precision ``name`` means on ``device``. ``auto``: on CUDA bf16 where supported,
    else fp16; on the CPU fp32 (bf16 pays only on CPUs with native bf16: ask for it).
    :class:`CadisError` for an unknown name or one the device cannot run."""
    if name == "auto":
        if device.type != "cuda":
            return FP32
        return PRECISIONS["bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    if name not in PRECISIONS:
        raise CadisError(f"unknown precision {name!r}; allowed: {', '.join(PRECISION_CHOICES)}")
    precision = PRECISIONS[name]
    if device.type not in precision.devices:
        raise CadisError(f"precision {name} does not run on {device.type}; there: "
                         + ", ".join(p.name for p in PRECISIONS.values()
                                     if device.type in p.devices))
    return precision


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The context forwards of ``precision`` run under on ``device``."""
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)


def compile_base(base: nn.Module) -> nn.Module:
    """``base`` compiled by ``torch.compile`` (the compile itself happens at the first forward,
    once per input shape; the caller times it). Shares the base's parameters."""
    return torch.compile(base)


def _predictions(base: nn.Module, draws: Iterable[Tensor], precision: Precision,
                 device: torch.device) -> Tensor:
    with torch.inference_mode(), autocast(precision, device):
        return torch.cat([base(batch).argmax(dim=1) for batch in draws])


def agreement(reference: nn.Module, fast: nn.Module, draws: list[Tensor],
              precision: Precision, device: torch.device) -> float:
    """The share of ``draws`` (batches of noisy images) on which ``fast`` under ``precision``
    predicts the class the fp32 ``reference`` does. Both must already be in eval mode."""
    expected = _predictions(reference, draws, FP32, device)
    return float((_predictions(fast, draws, precision, device) == expected).double().mean())


def check_agreement(reference: nn.Module, fast: nn.Module, draws: list[Tensor],
                    precision: Precision, compiled: bool, device: torch.device) -> float:
    """:func:`agreement`, or :class:`CadisError` saying what to change when it is below
    :data:`MIN_AGREEMENT`; returns the share."""
    share = agreement(reference, fast, draws, precision, device)
    if share < MIN_AGREEMENT:
        what = precision.name + (" compiled" if compiled else "")
        total = sum(len(batch) for batch in draws)
        raise CadisError(f"the {what} base predicts what fp32 eager predicts on only "
                         f"{100 * share:.2f}% of {total} check draws (needs "
                         f"{100 * MIN_AGREEMENT:.1f}%): certify with precision fp32"
                         + (" and without compile" if compiled else ""))
    return share
