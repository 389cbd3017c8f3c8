"""How many paired images it would take to separate two classifiers at a radius, from the
discordance measured between them: a projection, for comparisons the data did not decide.

Two classifiers certified on the same images (and draws) differ only on the *discordant*
images, those one certifies at the radius and the other does not. McNemar's exact test
(:func:`cadis.smoothing.paired.mcnemar_p`) conditions on their number D: under the null each is
the first's with probability 1/2. If on a larger hold-out each image were the first's alone
with probability ``only_first`` and the second's alone with ``only_second`` (the rates
measured), D ~ Binomial(images, only_first + only_second) and the first's share of them
~ Binomial(D, only_first / (only_first + only_second)); :func:`mcnemar_power` sums the
probability that the test rejects in the first's favour over both. :func:`images_to_separate`
is the smallest hold-out on a geometric grid with that power at :data:`POWER`.

It assumes the measured rates hold on the images not yet seen, which is the assumption to
doubt: rates measured on a few discordant images are themselves noisy.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from scipy.stats import binom

#: The power a projected hold-out must reach (the usual planning value).
POWER: Final = 0.8
#: The projection's grid: from this many images, each step this much larger, up to the last.
FIRST_IMAGES: Final = 100
GRID_STEP: Final = 1.25
MOST_IMAGES: Final = 200_000
#: Discordant counts this improbable at either end are left out of the sum.
TAIL: Final = 1e-9
#: The null's share of the discordant images that are the first classifier's.
EVEN_SPLIT: Final = 0.5


def mcnemar_power(images: int, only_first: float, only_second: float, alpha: float) -> float:
    """The probability that McNemar's exact two-sided test at ``alpha`` over ``images``
    paired images rejects with the first classifier ahead, when an image is certified by the
    first alone with probability ``only_first`` and by the second alone with
    ``only_second`` (both > 0 in sum)."""
    discordant_rate = only_first + only_second
    share = only_first / discordant_rate
    low, high = binom.ppf([TAIL, 1 - TAIL], images, discordant_rate).astype(int)
    power = 0.0
    for discordant in range(max(low, 1), high + 1):
        ahead = np.arange(discordant // 2 + 1, discordant + 1)
        p = np.minimum(1.0, 2 * binom.sf(ahead - 1, discordant, EVEN_SPLIT))
        power += binom.pmf(discordant, images, discordant_rate) * \
            binom.pmf(ahead[p <= alpha], discordant, share).sum()
    return float(power)


def images_to_separate(only_first: int, only_second: int, images: int,
                       alpha: float) -> int | None:
    """The smallest hold-out on the grid (:data:`FIRST_IMAGES` growing by
    :data:`GRID_STEP`) at which :func:`mcnemar_power` reaches :data:`POWER`, at the rates
    ``only_first / images`` and ``only_second / images`` measured on ``images`` images; None
    where the first is not ahead on them (no hold-out would show it ahead at those rates) or
    none up to :data:`MOST_IMAGES` does."""
    if only_first <= only_second:
        return None
    size = FIRST_IMAGES
    while size <= MOST_IMAGES:
        if mcnemar_power(size, only_first / images, only_second / images, alpha) >= POWER:
            return size
        size = int(size * GRID_STEP)
    return None
