"""The precisions certification forwards may run in (a registry), the agreement check that a
fast base must pass before its figures stand for the fp32 model's, and torch.compile."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from cadis.errors import CadisError
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.image_noise import image_noise
from cadis.smoothing.precision import (
    AGREEMENT_DRAWS,
    FP32,
    MIN_AGREEMENT,
    PRECISIONS,
    agreement,
    check_agreement,
    compile_base,
    resolve_precision,
)
from cadis.smoothing.smooth import Smooth, check_draws

CPU = torch.device("cpu")
SIGMA = 0.25


class Linear(nn.Module):
    """A seeded linear classifier of 1x4x4 images: its argmax moves with the noise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layer(images.flatten(1) - 0.5) * 10


class Shuffled(Linear):
    """The same classifier with its classes renamed: a base that computes something else."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).roll(1, dims=1)


def draws(count: int = AGREEMENT_DRAWS, images: int = 20) -> list[torch.Tensor]:
    batch = torch.rand(images, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return check_draws(batch, SIGMA, image_noise(0, "test", range(images), CPU), count // images,
                       100)


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_each_precision_runs_where_it_says_and_is_refused_elsewhere(name):
    precision = PRECISIONS[name]
    if "cpu" in precision.devices:
        assert resolve_precision(name, CPU) is precision
    else:
        with pytest.raises(CadisError, match=f"precision {name} does not run on cpu"):
            resolve_precision(name, CPU)


def test_auto_is_fp32_on_the_cpu_and_unknown_names_list_the_allowed():
    assert resolve_precision("auto", CPU) is FP32
    with pytest.raises(CadisError, match="unknown precision 'fp8'; allowed: auto, fp32"):
        resolve_precision("fp8", CPU)


def test_check_draws_are_as_many_as_asked_and_seeded():
    first, again = draws(), draws()
    assert sum(len(batch) for batch in first) == AGREEMENT_DRAWS
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_the_same_base_agrees_everywhere_and_bf16_nearly():
    base = Linear().eval()
    assert agreement(base, base, draws(), FP32, CPU) == 1.0
    assert check_agreement(base, base, draws(), PRECISIONS["bf16"], False, CPU) >= MIN_AGREEMENT


def test_a_base_that_computes_something_else_is_refused_with_what_to_do():
    with pytest.raises(CadisError, match=r"bf16 base predicts what fp32 eager predicts on only "
                                         r"[0-9.]+% of 2000 check draws.*precision fp32"):
        check_agreement(Linear().eval(), Shuffled().eval(), draws(), PRECISIONS["bf16"], False,
                        CPU)


def test_bf16_changes_the_base_not_the_noise():
    """Smooth in bf16 draws the same fp32 noise: with a base that autocast leaves alone (its
    logits are its input's pixels), the answers equal fp32's exactly."""
    image = torch.rand(1, 1, 4, 4)
    parameters = CertificationParameters(10, 200, 0.01, 50)
    answers = [Smooth(nn.Flatten(), 16, SIGMA, precision=precision).certify_many(
                   image, parameters, image_noise(0, "test", [7], CPU))
               for precision in (FP32, PRECISIONS["bf16"])]
    assert answers[0] == answers[1]


@pytest.mark.skipif(shutil.which("g++") is None,
                    reason="torch.compile's CPU kernels need g++ (make setup installs it)")
def test_a_compiled_base_predicts_what_eager_does():
    base = Linear().eval()
    assert agreement(base, compile_base(base), draws(200, 2), FP32, CPU) == 1.0
