"""Paired comparison of certifications of the same images: at a radius, is A's certified
accuracy different from B's beyond noise, and by how much?

Each image is certified at ``r`` by A or not, and by B or not; only the discordant images
(one certifies, the other does not) say anything about the difference. Under the null
hypothesis that A and B certify at the same rate, each discordant image is A's with
probability 1/2, so the count of A-only images among the discordant ones is Binomial(d, 1/2):
McNemar's exact test, two-sided. How large the difference is comes with a paired bootstrap
interval: the images are resampled with replacement, each keeping its pair of outcomes, and
the percentile interval of the resampled differences is reported (the same resamples for
every radius and for the ACR, seeded, so a table is reproducible).

What may be paired (:func:`check_pairable`): records of the same images (the same data set
and split, the same indices, each image once and with the same label in both) made with the
same sigma, n, n0 and alpha, on the same off-the-shelf pair. Different image sets have no
pairs; different settings are refused too, because a difference in certified accuracy at
other settings measures the settings (a larger n certifies larger radii with the same model)
and not what the two records are meant to compare (a checkpoint, a precision, a sequential
or fixed test); so are records whose settings name other model hashes
(:data:`~cadis.models.identity.MODEL_HASHES`): two pretrained pairs certify images
differently, and a checkpoint fine-tuned from one does not pair with the other.
Records that name no hashes (made before cadis recorded them) pair as before, unchecked
(:func:`unchecked_models`). Anything else may differ. Whether the two were also made from the same noise draws is
read from their settings (:func:`shared_noise`); the tests hold either way (the images are
the unit), shared draws only make the difference less noisy.

Torch-free (``cadis analyze`` loads no torch); plots use matplotlib's Agg canvas.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from scipy.stats import binomtest

from cadis.errors import CadisError
from cadis.models.identity import MODEL_HASHES, MODEL_ROLES
from cadis.smoothing.multiplicity import CORRECTION_CONTROLS, CORRECTION_NAMES, adjust_grouped
from cadis.smoothing.records import (
    CERTIFICATION_SETTINGS,
    CSV_DIGITS,
    MARKDOWN_DIGITS,
    Record,
    TableFormat,
    draw_certified_accuracy,
    format_table,
    is_sequential,
    radius_key,
    read_records,
    read_settings,
    render_table,
    save_png,
)

#: Bootstrap resamples of the images: at 10,000 the interval's ends move by well under a
#: point of accuracy from one seed to another.
BOOTSTRAP_RESAMPLES: Final = 10_000
#: The bootstrap's seed when none is given: the same records give the same intervals.
BOOTSTRAP_SEED: Final = 0
#: Coverage of the bootstrap interval.
CONFIDENCE: Final = 0.95
#: Resamples x images drawn at a time: bounds the bootstrap's memory (32 MiB of indices)
#: whatever the number of images.
RESAMPLE_BLOCK_CELLS: Final = 2 ** 22
#: Relative rounding allowed when a permuted sum is compared with the observed one.
SUM_TOLERANCE: Final = 1e-9
#: How far left of radius 0 the differences' panel starts, as a share of its width.
PLOT_LEFT_MARGIN: Final = 0.03
#: The paired plot's legend, below the differences: at most this many entries a row.
LEGEND_COLUMNS: Final = 3
#: Below this a p-value is written in scientific notation, not rounded to 0.
SMALL_P: Final = 0.001
#: `cadis certify` certifies the test split and writes no ``split``; the sweeps' rank stage
#: writes ``"validation"``.
DEFAULT_SPLIT: Final = "test"
#: Hex digits of a model's sha256 shown when two records name other models.
HASH_SHOWN: Final = 12
#: What names the images besides their indices: an index of another data set or split is
#: another image.
IMAGE_SETTINGS: Final = ("dataset", "split")


@dataclass(frozen=True)
class PairedResult:
    """At one radius: images, each side's certified accuracy, the discordant counts and the
    exact two-sided p-value of "A and B certify at the same rate"."""

    radius: float
    images: int
    accuracy_a: float
    accuracy_b: float
    only_a: int
    only_b: int
    p_value: float


def certified_at(record: Record, radius: float) -> bool:
    """Whether a record is correct and certified at ``radius`` (how certified accuracy counts)."""
    return record.correct and record.radius >= radius


def certified_matrix(records: Sequence[Record], radii: Sequence[float]) -> np.ndarray:
    """``[image, radius]``: whether each record is certified at each radius
    (:func:`certified_at`), images in the order of ``records``."""
    certified = np.array([record.radius if record.correct else -math.inf
                          for record in records])
    return certified[:, None] >= np.asarray(radii, dtype=float)[None, :]


def certified_radii(records: Sequence[Record]) -> np.ndarray:
    """Each record's certified radius, 0 unless correct: the values ACR averages."""
    return np.array([record.radius if record.correct else 0.0 for record in records])


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value from the discordant counts (1 when there are none)."""
    discordant = only_a + only_b
    return 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)


def _image_order(records: Sequence[Record], name: str) -> dict[int, Record]:
    by_image = {record.idx: record for record in records}
    if len(by_image) != len(records):
        twice = next(idx for idx in by_image
                     if sum(record.idx == idx for record in records) > 1)
        raise CadisError(f"{name} records image {twice} more than once: not one certification "
                         "of each image")
    return by_image


def aligned(a: Sequence[Record], b: Sequence[Record], names: tuple[str, str] = ("A", "B")
            ) -> tuple[list[Record], list[Record]]:
    """``a`` and ``b`` in the same image order (by index), or :class:`CadisError` naming
    ``names`` and how the two differ: other images (how many each has, how many in common),
    an image recorded twice, or an index whose label differs (another data set)."""
    name_a, name_b = names
    by_image_a, by_image_b = _image_order(a, name_a), _image_order(b, name_b)
    if by_image_a.keys() != by_image_b.keys():
        common = len(by_image_a.keys() & by_image_b.keys())
        raise CadisError(f"{name_a} and {name_b} certify different images: {name_a} has "
                         f"{len(a)} images, {name_b} {len(b)}; {common} in common")
    order = sorted(by_image_a)
    relabelled = next((idx for idx in order
                       if by_image_a[idx].label != by_image_b[idx].label), None)
    if relabelled is not None:
        raise CadisError(f"{name_a} and {name_b} give image {relabelled} different labels "
                         f"({by_image_a[relabelled].label} and {by_image_b[relabelled].label}): "
                         "not the same images")
    return [by_image_a[idx] for idx in order], [by_image_b[idx] for idx in order]


def paired_test(a: Sequence[Record], b: Sequence[Record], radius: float) -> PairedResult:
    """McNemar's exact test of A against B at ``radius`` over the same images; records of
    different image sets are refused (:class:`CadisError`)."""
    return _paired_tests(*aligned(a, b), [radius])[0]


def _paired_tests(a: list[Record], b: list[Record], radii: Sequence[float]
                  ) -> list[PairedResult]:
    """:func:`paired_test` at each of ``radii`` for records already :func:`aligned`."""
    certified_a, certified_b = certified_matrix(a, radii), certified_matrix(b, radii)
    only_a = (certified_a & ~certified_b).sum(axis=0)
    only_b = (certified_b & ~certified_a).sum(axis=0)
    return [PairedResult(float(radius), len(a), float(certified_a[:, column].mean()),
                         float(certified_b[:, column].mean()), int(only_a[column]),
                         int(only_b[column]), mcnemar_p(int(only_a[column]), int(only_b[column])))
            for column, radius in enumerate(radii)]


def paired_bootstrap(values_a: np.ndarray, values_b: np.ndarray,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> np.ndarray:
    """The paired bootstrap's percentile interval of ``mean(values_a - values_b)`` for each
    column: ``[[low, ...], [high, ...]]``.

    Rows are images (the i-th of A and of B are one image's pair); a resample draws images with
    replacement, keeping each pair, and is the same for every column. Reproducible: the same
    arrays, ``resamples`` and ``seed`` give the same interval.
    """
    differences = np.asarray(values_a, dtype=float) - np.asarray(values_b, dtype=float)
    if differences.ndim != 2 or not len(differences):
        raise CadisError("the bootstrap needs an images x statistics array of one image or more")
    images = len(differences)
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, differences.shape[1]))
    block = max(1, RESAMPLE_BLOCK_CELLS // images)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        picks = rng.integers(0, images, size=(size, images))
        # How often each resample took each image: its mean is then one matrix product,
        # without a (resamples, images, statistics) array.
        offsets = picks + images * np.arange(size)[:, None]
        counts = np.bincount(offsets.ravel(), minlength=size * images).reshape(size, images)
        means[start:start + size] = counts @ differences / images
    tail = (1.0 - confidence) / 2
    return np.quantile(means, [tail, 1.0 - tail], axis=0)


def sign_flip_floor(resamples: int) -> float:
    """The smallest p :func:`sign_flip_p` gives with ``resamples`` flips (none as extreme as
    the observed difference, as_extreme = 0 in its formula): a p there is a bound, the true
    p may be smaller."""
    return 1.0 / (1.0 + resamples)


def sign_flip_p(differences: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The paired sign-flip permutation test's two-sided p-value of "the mean difference is 0"
    for each column of ``differences`` (rows are images, each row one image's difference).

    Under the null hypothesis each image's difference is as likely to have the other sign
    (which side is which is exchangeable), so the observed mean is compared with the means of
    ``resamples`` random sign flips of the images, the same flips for every column. The
    p-value counts the observed arrangement among them, ``(1 + as extreme) / (1 + resamples)``,
    so it is valid at any number of resamples and never 0; all-zero differences give 1.
    Reproducible: the same array, ``resamples`` and ``seed`` give the same p-values.
    """
    differences = np.asarray(differences, dtype=float)
    if differences.ndim != 2 or not len(differences):
        raise CadisError("the sign-flip test needs an images x statistics array of one image "
                         "or more")
    images = len(differences)
    observed = np.abs(differences.sum(axis=0))
    # Sums of the same magnitudes in another order differ in the last bits: a flip that
    # reaches the observed sum up to rounding counts as reaching it.
    tolerance = SUM_TOLERANCE * np.maximum(1.0, np.abs(differences).sum(axis=0))
    as_extreme = np.zeros(differences.shape[1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    block = max(1, RESAMPLE_BLOCK_CELLS // images)
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        signs = rng.integers(0, 2, size=(size, images)) * 2.0 - 1.0
        as_extreme += (np.abs(signs @ differences) >= observed - tolerance).sum(axis=0)
    return (1.0 + as_extreme) / (1.0 + resamples)


@dataclass(frozen=True)
class Comparison:
    """A against the baseline B over the same images: per radius McNemar's test (``tests``;
    the difference is ``accuracy_a - accuracy_b``) and the bootstrap interval of that
    difference (``intervals``); each side's ACR and the interval of ``acr_a - acr_b``; the
    bootstrap's ``resamples`` and ``seed``."""

    tests: tuple[PairedResult, ...]
    intervals: tuple[tuple[float, float], ...]
    acr_a: float
    acr_b: float
    acr_interval: tuple[float, float]
    resamples: int
    seed: int


def compare(a: Sequence[Record], b: Sequence[Record], radii: Sequence[float],
            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """A against B at each of ``radii`` and in ACR, over the same images (else
    :class:`CadisError`); one bootstrap of the images serves every radius and the ACR."""
    a, b = aligned(a, b)
    values_a = np.column_stack([certified_matrix(a, radii), certified_radii(a)])
    values_b = np.column_stack([certified_matrix(b, radii), certified_radii(b)])
    low, high = paired_bootstrap(values_a, values_b, resamples, seed)
    bounds = [(float(lo), float(hi)) for lo, hi in zip(low, high)]
    return Comparison(tuple(_paired_tests(a, b, radii)), tuple(bounds[:-1]),
                      float(values_a[:, -1].mean()), float(values_b[:, -1].mean()), bounds[-1],
                      resamples, seed)


# --------------------------------------------------------------------------- record folders


@dataclass(frozen=True)
class Certification:
    """A records file under its label, with the settings it was made with (``settings.json``
    beside it)."""

    label: str
    path: Path
    records: list[Record]
    settings: dict[str, Any]

    @classmethod
    def read(cls, label: str, path: str | os.PathLike) -> Certification:
        """The records at ``path`` and their settings; :class:`CadisError` when either is
        missing or unreadable, or the settings lack sigma, n, n0 or alpha."""
        settings = read_settings(path)
        unusable = [key for key in CERTIFICATION_SETTINGS
                    if isinstance(settings.get(key), bool)
                    or not isinstance(settings.get(key), (int, float))]
        if unusable:
            raise CadisError(f"the settings beside {path} give no number for "
                             f"{', '.join(unusable)}")
        records = read_records(path)
        if not records:
            raise CadisError(f"{path} holds no records")
        return cls(label, Path(path), records, settings)

    def model_hashes(self) -> dict[str, str | None]:
        """The sha256 of each model its settings name (None where they name none)."""
        named = self.settings.get(MODEL_HASHES)
        named = named if isinstance(named, Mapping) else {}
        return {role: named.get(role) if isinstance(named.get(role), str) else None
                for role in MODEL_ROLES}

    def images(self) -> tuple[str, str]:
        """The data set and split the indices name."""
        return (str(self.settings.get("dataset", "?")),
                str(self.settings.get("split", DEFAULT_SPLIT)))


def check_pairable(reference: Certification, other: Certification) -> None:
    """:class:`CadisError`, in one line naming both files and how they differ, unless
    ``other`` can be paired with ``reference``: the same data set and split, the same images
    (:func:`aligned`), the same sigma, n, n0 and alpha, and no model whose sha256 both name
    and that differs (the module docstring says why)."""
    names = (str(reference.path), str(other.path))
    if reference.images() != other.images():
        raise CadisError(f"cannot pair {names[0]} with {names[1]}: they certify images of "
                         f"{' '.join(reference.images())} and {' '.join(other.images())}, "
                         "so an index names another image in each")
    try:
        aligned(reference.records, other.records, names)
    except CadisError as error:
        raise CadisError(f"cannot pair: {error} (--unpaired puts them side by side)") from None
    differing = [f"{key} {reference.settings[key]!r} in {names[0]}, {other.settings[key]!r} in "
                 f"{names[1]}" for key in CERTIFICATION_SETTINGS
                 if reference.settings[key] != other.settings[key]]
    if differing:
        raise CadisError(f"cannot pair records made with other settings ({'; '.join(differing)}):"
                         " a paired test compares equal settings (--unpaired puts them side by "
                         "side)")
    hashes = reference.model_hashes(), other.model_hashes()
    other_models = [f"{role} sha256 {hashes[0][role][:HASH_SHOWN]} in {names[0]}, "
                    f"{hashes[1][role][:HASH_SHOWN]} in {names[1]}" for role in MODEL_ROLES
                    if None not in (hashes[0][role], hashes[1][role])
                    and hashes[0][role] != hashes[1][role]]
    if other_models:
        raise CadisError(f"cannot pair records made on other models ({'; '.join(other_models)}):"
                         " a paired test compares certifications of one off-the-shelf pair "
                         "(--unpaired puts them side by side)")


def unchecked_models(certifications: Sequence[Certification]) -> list[str]:
    """The labels of those ``certifications`` whose settings do not name the sha256 of
    both models (records made before cadis recorded them, or models named rather than held
    as files): whether they were made on the same models cannot be checked."""
    return [certification.label for certification in certifications
            if None in certification.model_hashes().values()]


def shared_noise(reference: Certification, other: Certification) -> tuple[bool, str]:
    """Whether two pairable certifications drew the same noise for each image, and what shows
    it: their settings name the same noise scheme (``noise``, equal and not None: whichever
    scheme cadis then had, each image drew from its own seeded generator) with the same seed,
    or both read their draws from stores of the same key (the store's folder name is its
    key's digest, which holds the seed and the scheme; the folders may lie in different
    places). The images, sigma, n0 and n being equal, each image's noise is then the same in
    both (on the same kind of device: the device is not in the settings, and a CPU and a CUDA
    generator give different streams). Records whose settings show neither are read as
    independent draws."""
    stores = [certification.settings.get("stored_draws") for certification in (reference, other)]
    if None not in stores and Path(stores[0]).name == Path(stores[1]).name:
        return True, f"the same for each image (stored draws {Path(stores[0]).name})"
    schemes = [certification.settings.get("noise") for certification in (reference, other)]
    if schemes[0] is None or schemes[0] != schemes[1]:
        unnamed = [certification.label for certification, scheme in zip((reference, other),
                                                                         schemes)
                   if scheme is None]
        why = (f"the settings of {' and '.join(unnamed)} name no per-image noise scheme"
               if unnamed else f"noise schemes differ ({schemes[0]!r}, {schemes[1]!r})")
        return False, f"independent: {why}"
    seeds = reference.settings.get("seed"), other.settings.get("seed")
    if seeds[0] is None or seeds[0] != seeds[1]:
        return False, f"independent: seeds {seeds[0]} and {seeds[1]}"
    return True, f"the same for each image (seed {seeds[0]}, per-image generators)"


def describe_indices(indices: Sequence[int]) -> str:
    """A set of image indices in words: "idx 0 to 9980, step 20" (or "irregular steps")."""
    ordered = sorted(indices)
    if len(ordered) == 1:
        return f"idx {ordered[0]}"
    steps = set(np.diff(ordered).tolist())
    step = f"step {steps.pop()}" if len(steps) == 1 else "irregular steps"
    return f"idx {ordered[0]} to {ordered[-1]}, {step}"


def describe_images(certification: Certification) -> str:
    """Which images, in words: "500 fashion-mnist test images (idx 0 to 9980, step 20)"."""
    dataset, split = certification.images()
    indices = [record.idx for record in certification.records]
    return f"{len(indices)} {dataset} {split} images ({describe_indices(indices)})"


def describe_settings(certification: Certification) -> str:
    """The images and the certification settings: what every paired table states."""
    settings = certification.settings
    return (f"{describe_images(certification)}; n = {settings['n']}, n0 = {settings['n0']}, "
            f"alpha = {settings['alpha']:g}, sigma = {settings['sigma']:g}")


def compare_certifications(reference: Certification, others: Sequence[Certification],
                           radii: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> list[Comparison]:
    """Each of ``others`` against ``reference`` (:func:`compare`), every pair checked first
    (:func:`check_pairable`), so nothing is computed for a refused set."""
    if not others:
        raise CadisError("a paired comparison needs two or more records files")
    for other in others:
        check_pairable(reference, other)
    return [compare(other.records, reference.records, radii, resamples, seed)
            for other in others]


def family_adjusted(comparisons: Sequence[Comparison], correction: str | None
                    ) -> list[list[float]] | None:
    """The p-values of every test of ``comparisons`` (every radius of every compared set: one
    family) adjusted together by ``correction`` (a key of
    :data:`~cadis.smoothing.multiplicity.CORRECTIONS`), shaped as the comparisons' tests;
    None when ``correction`` is None."""
    if correction is None:
        return None
    return adjust_grouped([[test.p_value for test in comparison.tests]
                           for comparison in comparisons], correction)


def describe_family(comparisons: Sequence[Comparison], correction: str) -> str:
    """What a corrected table's header says: which correction, what it controls, over which
    family."""
    radii, sets = len(comparisons[0].tests), len(comparisons)
    return (f"p-values adjusted by {CORRECTION_NAMES[correction]} "
            f"({CORRECTION_CONTROLS[correction]}) over one family of {radii * sets} tests: "
            f"all {radii} radii x {sets} compared sets of this run")


def _acr_comparable(reference: Certification, other: Certification) -> bool:
    # Sequential records hold grid radii: their ACR is an average over the grid, not
    # comparable with a fixed-n ACR.
    return is_sequential(reference.records) == is_sequential(other.records)


def format_comparison(reference: Certification, others: Sequence[Certification],
                      comparisons: Sequence[Comparison], radii: Sequence[float],
                      fmt: TableFormat = "markdown", correction: str | None = None) -> str:
    """The comparisons of :func:`compare_certifications` as text.

    Markdown: certified accuracy side by side (:func:`~cadis.smoothing.records.format_table`),
    then per other record set a table of its difference from the baseline per radius and in
    ACR, with the interval, the discordant counts and McNemar's p; each table is preceded by a
    line naming the images, n, n0, alpha and sigma (and the noise draws). CSV: one tidy table,
    a row per record set and radius (and ACR), each row naming the same.

    With a ``correction`` (``holm`` or ``bh``) every p-value of the run is adjusted as one
    family (:func:`family_adjusted`): markdown gives the adjusted p beside the raw one under a
    header naming the correction and the family, CSV adds ``p_adjusted``, ``correction`` and
    ``family_size`` columns. Without one the output is as it always was.
    """
    adjusted = family_adjusted(comparisons, correction)
    if fmt == "csv":
        return _comparison_csv(reference, others, comparisons, correction, adjusted)
    caption = describe_settings(reference)
    parts = [f"Certified accuracy: {caption}\n\n"
             + format_table({c.label: c.records for c in (reference, *others)}, radii)]
    if correction is not None:
        parts.insert(0, f"{describe_family(comparisons, correction)}.\n")
    for position, (other, comparison) in enumerate(zip(others, comparisons)):
        _, noise = shared_noise(reference, other)
        rows = [[radius_key(test.radius), format_signed(test.accuracy_a - test.accuracy_b),
                 format_interval(interval), str(test.only_a), str(test.only_b),
                 format_p(test.p_value)]
                for test, interval in zip(comparison.tests, comparison.intervals)]
        blank = [""] * (len(rows[0]) - 3)
        if _acr_comparable(reference, other):
            rows.append(["ACR", format_signed(comparison.acr_a - comparison.acr_b),
                         format_interval(comparison.acr_interval), *blank])
        else:
            rows.append(["ACR", "n/a: one is sequential (its ACR is over the grid)", "",
                         *blank])
        header = ["radius", f"{other.label} − {reference.label}",
                  f"{CONFIDENCE:.0%} interval", f"only {other.label}",
                  f"only {reference.label}", "p"]
        if adjusted is not None:
            header.append(f"{CORRECTION_NAMES[correction]} p")
            for row, p in zip(rows, adjusted[position]):
                row.append(format_p(p))
            rows[-1].append("")
        method = (f"McNemar's exact two-sided p; paired bootstrap {CONFIDENCE:.0%} interval "
                  f"({comparison.resamples:,} resamples of the images, seed {comparison.seed})")
        parts.append(f"{other.label} against {reference.label}: {caption}; noise draws "
                     f"{noise}. {method}\n\n" + render_table(header, rows, "markdown"))
    return "\n".join(parts)


#: The CSV's columns: what was compared, the result, and what made the records.
COMPARISON_COLUMNS: Final = (
    "label", "reference", "radius", "value", "reference_value", "difference", "low", "high",
    "only_label", "only_reference", "p_value", "images", "idx", "dataset", "split", "n", "n0",
    "alpha", "sigma", "same_noise")


#: The columns a corrected CSV adds: the adjusted p, the correction and the family's size.
CORRECTION_COLUMNS: Final = ("p_adjusted", "correction", "family_size")


def _comparison_csv(reference: Certification, others: Sequence[Certification],
                    comparisons: Sequence[Comparison], correction: str | None = None,
                    adjusted: Sequence[Sequence[float]] | None = None) -> str:
    settings = reference.settings
    made = [str(len(reference.records)),
            describe_indices([record.idx for record in reference.records]),
            *reference.images(), *(str(settings[key]) for key in ("n", "n0", "alpha", "sigma"))]

    def number(value: float) -> str:
        return f"{value:.{CSV_DIGITS}f}"

    def corrected(p: float | None) -> list[str]:
        if adjusted is None:
            return []
        family = sum(len(comparison.tests) for comparison in comparisons)
        return ["" if p is None else f"{p:.{CSV_DIGITS}g}", str(correction), str(family)]

    rows = []
    for position, (other, comparison) in enumerate(zip(others, comparisons)):
        same = str(shared_noise(reference, other)[0]).lower()
        for column, (test, (low, high)) in enumerate(zip(comparison.tests,
                                                         comparison.intervals)):
            rows.append([other.label, reference.label, radius_key(test.radius),
                         number(test.accuracy_a), number(test.accuracy_b),
                         number(test.accuracy_a - test.accuracy_b), number(low), number(high),
                         str(test.only_a), str(test.only_b), f"{test.p_value:.{CSV_DIGITS}g}",
                         *made, same,
                         *corrected(None if adjusted is None else adjusted[position][column])])
        if _acr_comparable(reference, other):
            low, high = comparison.acr_interval
            rows.append([other.label, reference.label, "ACR", number(comparison.acr_a),
                         number(comparison.acr_b), number(comparison.acr_a - comparison.acr_b),
                         number(low), number(high), "", "", "", *made, same, *corrected(None)])
    columns = COMPARISON_COLUMNS + (CORRECTION_COLUMNS if adjusted is not None else ())
    return render_table(columns, rows, "csv")


def format_signed(value: float) -> str:
    """A difference with its sign: ``+0.040``."""
    return f"{value:+.{MARKDOWN_DIGITS}f}"


def format_p(p: float) -> str:
    """A p-value in a table: three decimals, scientific notation below :data:`SMALL_P`."""
    return f"{p:.1e}" if p < SMALL_P else f"{p:.{MARKDOWN_DIGITS}f}"


def format_interval(bounds: tuple[float, float]) -> str:
    """An interval of differences: ``[-0.010, +0.030]``."""
    return f"[{format_signed(bounds[0])}, {format_signed(bounds[1])}]"


def plot_comparison(reference: Certification, others: Sequence[Certification],
                    comparisons: Sequence[Comparison], path: str | os.PathLike) -> Path:
    """Save the paired comparison as a PNG: the certified-accuracy curves above, and below,
    per other record set, its difference from the baseline at each radius of the
    comparisons with the bootstrap interval as an error bar; titled with the images, n, n0,
    alpha and sigma. Written atomically (:func:`~cadis.smoothing.records.save_png`)."""
    from matplotlib.figure import Figure

    rows = -(-len(others) // LEGEND_COLUMNS)
    figure = Figure(figsize=(7.0, 7.4 + 0.2 * rows))
    curves, differences = figure.subplots(2, 1, height_ratios=(3, 2))
    draw_certified_accuracy(curves, {c.label: c.records for c in (reference, *others)})
    # The images on one line, the settings on the next: one line is wider than the figure.
    curves.set_title(describe_settings(reference).replace("; ", "\n", 1), fontsize="small")
    colours = [line.get_color() for line in curves.get_lines()[1:]]
    radii = np.array([test.radius for test in comparisons[0].tests])
    # Side by side at each radius, so that the bars of several comparisons do not overlap.
    spread = (np.min(np.diff(radii)) if len(radii) > 1 else 1.0) / (4 * len(others))
    for position, (other, comparison) in enumerate(zip(others, comparisons)):
        middle = np.array([test.accuracy_a - test.accuracy_b for test in comparison.tests])
        low, high = np.array(comparison.intervals).T
        differences.errorbar(radii + spread * (position - (len(others) - 1) / 2), middle,
                             yerr=[middle - low, high - middle], fmt="o", capsize=3,
                             color=colours[position], label=f"{other.label} − {reference.label}")
    differences.axhline(0.0, color="grey", linewidth=0.8)
    # A little left of 0, so that the bar at radius 0 is not cut by the frame.
    right = curves.get_xlim()[1]
    differences.set_xlim(min(radii.min(), 0.0) - PLOT_LEFT_MARGIN * right, right)
    differences.set_xlabel("radius (l2)")
    differences.set_ylabel("difference in certified accuracy")
    differences.grid(alpha=0.3)
    # Below the axes, not over the bars: with several arms an inside legend hides some.
    differences.legend(title=f"{CONFIDENCE:.0%} paired bootstrap interval", fontsize="small",
                       loc="upper center", bbox_to_anchor=(0.5, -0.25),
                       ncols=min(len(others), LEGEND_COLUMNS), frameon=False)
    return save_png(figure, path)
