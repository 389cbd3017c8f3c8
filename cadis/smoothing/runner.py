"""Certify a data set image by image into an output folder that can be resumed.

The folder holds ``settings.json`` (what the records were made with), ``records.tsv`` (one
row per certified image, appended as it goes), and, derived from the records,
``summary.json`` and ``certified_accuracy.png``. Running again with the same settings
certifies only the images that have no record yet; running with other settings is refused
rather than mixing two experiments in one file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cadis.errors import CadisError
from cadis.files import atomic_write_text
from cadis.progress import progress_bar
from cadis.smoothing.bounds import CertificationParameters
from cadis.smoothing.records import (
    CERTIFICATION_SETTINGS,
    NOISE_PER_IMAGE,
    PLOT_FILENAME,
    RECORDS_FILENAME,
    SETTINGS_FILENAME,
    SUMMARY_FIELDS,
    SUMMARY_FILENAME,
    Record,
    RecordWriter,
    plot_certified_accuracy,
    read_records,
    read_settings,
    write_records,
    write_summary,
)
from cadis.smoothing.sequential import MODE_FIXED, MODE_SEQUENTIAL, SequentialPlan
from cadis.smoothing.smooth import (
    Smooth,
    image_generators,
    images_per_forward,
)


class ImageDataset(Protocol):
    """``dataset[i]`` is ``(image, label)``: a C x H x W tensor in [0, 1] and a class index."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


def _as_json(value: Any) -> Any:
    # What the value becomes once written to settings.json and read back: the form in which
    # the settings of two runs are compared.
    return json.loads(json.dumps(value, default=str))


def _run_settings(settings: Mapping[str, Any], *, sigma: float, n: int, n0: int,
                  alpha: float) -> dict[str, Any]:
    """The caller's settings completed with the certification's own; a disagreement between
    the two is a caller's mistake that would mislabel the records."""
    actual = {"sigma": sigma, "n": n, "n0": n0, "alpha": alpha}
    # Checked now rather than when the summary is written, after hours of certification.
    reserved = sorted(set(settings) & (set(SUMMARY_FIELDS) - set(actual)))
    if reserved:
        raise CadisError(f"settings may not be named {', '.join(reserved)}: "
                         "the summary computes them")
    disagreeing = [f"{key}={settings[key]!r} (certifying with {value!r})"
                   for key, value in actual.items() if key in settings and settings[key] != value]
    if disagreeing:
        raise CadisError(f"settings disagree with the certification: {', '.join(disagreeing)}")
    return _as_json({**settings, **actual})


def _claim(out_dir: Path, settings: dict[str, Any]) -> None:
    """Make ``out_dir`` the home of records made with ``settings``.

    Raises :class:`CadisError`, naming the differing keys and touching nothing, if it holds
    records made with other settings (or records whose settings are unknown).
    """
    settings_path = out_dir / SETTINGS_FILENAME
    if (out_dir / RECORDS_FILENAME).exists():
        if not settings_path.is_file():
            raise CadisError(f"{out_dir / RECORDS_FILENAME} exists without {SETTINGS_FILENAME}, "
                             "so how it was made is unknown; use another out_dir")
        previous = read_settings(out_dir / RECORDS_FILENAME)
        absent = object()
        differing = sorted(key for key in previous.keys() | settings.keys()
                           if previous.get(key, absent) != settings.get(key, absent))
        if differing:
            details = "; ".join(f"{key}: {previous.get(key, '<unset>')!r} there, "
                                f"{settings.get(key, '<unset>')!r} now" for key in differing)
            raise CadisError(f"{out_dir} holds records made with different settings "
                             f"({details}); use another out_dir")
        return
    # Settings first: records never exist without the settings that made them.
    atomic_write_text(settings_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _groups(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])


#: Certifies a group of data-set indices: ``[(label, prediction, radius), ...]`` in order,
#: sequential certification adding the draws spent: ``(label, prediction, radius, draws)``.
GroupCertifier = Callable[[list[int]], list[tuple]]


def certify_dataset(smooth: Smooth, dataset: ImageDataset, indices: Iterable[int],
                    parameters: CertificationParameters, out_dir: str | os.PathLike,
                    settings: Mapping[str, Any], radii: Sequence[float],
                    progress: bool = True, plan: SequentialPlan | None = None,
                    seed: int | None = None,
                    notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CERTIFY ``dataset[i]`` for each ``i`` of ``indices`` into ``out_dir`` and summarise.

    Writes ``settings.json`` (``settings`` completed with sigma, n, n0 and alpha), appends one
    record per image to ``records.tsv`` (skipping images already recorded there, so an
    interrupted run resumes), then writes ``summary.json`` and ``certified_accuracy.png`` for
    the records of ``indices`` (a records file may hold more) and returns the summary, whose
    extra fields are the settings. When several images' draws fit in one forward they are
    certified together (:meth:`Smooth.certify_batch`, same statistics) and each record's
    ``seconds`` is its share of the group's time.

    With ``plan``, each image is certified sequentially at the plan's radii
    (:meth:`Smooth.certify_sequential`, at most ``parameters.n`` estimation draws): records
    carry the draws spent and the grid radius certified, and the folder is one of that mode.

    With ``seed``, each image's noise comes from its own generator
    (:func:`~cadis.smoothing.smooth.image_generators`, the data-set index naming it), not from
    ``smooth``'s: an image's record is then the same whether it is certified alone, resumed,
    or in another shard (:func:`merge_records`); ``settings`` gain ``noise``. ``notes`` join
    the summary but not the settings (what was measured of the run, not what made it).

    Raises :class:`CadisError`, leaving ``out_dir`` untouched, if it holds records made with
    other settings.
    """
    device = smooth.device

    def certify(group: list[int]) -> list[tuple]:
        examples = [dataset[index] for index in group]
        images = torch.stack([image for image, _ in examples]).to(device)
        generators = None if seed is None else image_generators(seed, group, device)
        if plan is not None:
            return [(int(label), *smooth.certify_sequential(
                        image, parameters.n0, plan, parameters.batch_size,
                        None if generators is None else generators[position]))
                    for position, (image, (_, label)) in enumerate(zip(images, examples))]
        results = smooth.certify_images(images, parameters, generators)
        return [(int(label), prediction, radius)
                for (_, label), (prediction, radius) in zip(examples, results)]

    if seed is not None:
        settings = {**settings, "noise": NOISE_PER_IMAGE}
    return certify_records(certify, indices, parameters, smooth.sigma, out_dir, settings,
                           radii, progress, plan, notes)


def certify_records(certify: GroupCertifier, indices: Iterable[int],
                    parameters: CertificationParameters, sigma: float,
                    out_dir: str | os.PathLike, settings: Mapping[str, Any],
                    radii: Sequence[float], progress: bool = True,
                    plan: SequentialPlan | None = None,
                    notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`certify_dataset` for any way of certifying a group of indices (live draws, or
    stored ones: :mod:`cadis.smoothing.draws`): the same folder, records, resume and refusal
    of other settings, groups of :func:`images_per_forward` indices (one image at a time
    with a sequential ``plan``, whose description joins the settings)."""
    n0, n, alpha = parameters.n0, parameters.n, parameters.alpha
    wanted = list(dict.fromkeys(int(index) for index in indices))
    if not wanted:
        raise CadisError("no images to certify: indices is empty")
    if plan is not None and (plan.n_max != n or plan.alpha != alpha or plan.sigma != sigma):
        raise CadisError("the sequential plan's n, alpha and sigma must be the certification's")
    out_dir = Path(out_dir)
    mode = {} if plan is None else plan.describe()
    run_settings = _run_settings({**settings, **mode}, sigma=sigma, n=n, n0=n0, alpha=alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir, run_settings)

    records_path = out_dir / RECORDS_FILENAME
    wanted_set = set(wanted)
    recorded = {record.idx: record for record in read_records(records_path)
                if record.idx in wanted_set} if records_path.exists() else {}
    todo = [index for index in wanted if index not in recorded]
    correct = sum(record.correct for record in recorded.values())

    group_size = 1 if plan is not None else images_per_forward(n0, n, parameters.batch_size)
    with RecordWriter(records_path, sequential=plan is not None) as writer, \
            progress_bar(len(wanted), "certify", "img", enabled=progress,
                         initial=len(recorded)) as bar:
        for group in _groups(todo, group_size):
            start = time.perf_counter()
            results = certify(group)
            seconds = (time.perf_counter() - start) / len(group)
            for index, (label, prediction, radius, *spent) in zip(group, results):
                record = Record.from_prediction(index, label, prediction, radius, seconds,
                                                *spent)
                writer.write(record)
                recorded[index] = record
                correct += record.correct
            bar.set_postfix(cert_acc_r0=f"{correct / len(recorded):.3f}")
            bar.update(len(group))

    return _summarise(out_dir, [recorded[index] for index in wanted], run_settings, radii,
                      notes)


def _summarise(out_dir: Path, records: list[Record], run_settings: Mapping[str, Any],
               radii: Sequence[float], notes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write ``summary.json`` (the settings and ``notes`` among its fields) and the plot of
    ``records``, made with ``run_settings``."""
    sigma, n, n0, alpha = (run_settings[key] for key in CERTIFICATION_SETTINGS)
    sequential = run_settings.get("mode") == MODE_SEQUENTIAL
    extra = {key: value for key, value in {**run_settings, **(notes or {})}.items()
             if key not in CERTIFICATION_SETTINGS}
    extra["mode"] = MODE_SEQUENTIAL if sequential else MODE_FIXED
    # Sequential records hold grid radii: their ACR is an average over the grid.
    extra["acr_over"] = "grid" if sequential else "radius"
    extra["mean_draws"] = (sum(record.draws for record in records) / len(records)
                           if sequential else n0 + n)
    summary = write_summary(out_dir / SUMMARY_FILENAME, records, radii, sigma=sigma,
                            n=n, n0=n0, alpha=alpha, extra=extra)
    label = f"sigma={sigma:g}, n={n}"
    if sequential:
        label += f" at most, sequential ({extra['mean_draws']:.0f} draws an image)"
    plot_certified_accuracy({label: records}, out_dir / PLOT_FILENAME,
                            title=f"certified accuracy ({len(records)} images, n0={n0}, "
                                  f"alpha={alpha:g})")
    return summary


def merge_records(out_dir: str | os.PathLike, parts: Sequence[str | os.PathLike],
                  indices: Iterable[int] | None, radii: Sequence[float],
                  notes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Join the record folders ``parts`` (shards of one certification: each made with the
    same settings, together holding every index of ``indices``; None: the parts' records in
    the order of the parts) into ``out_dir`` and summarise it as :func:`certify_records`
    would have.

    The records are written in the order of ``indices``, so with per-image noise
    (``certify_dataset(seed=...)``) or stored draws the file equals a single run's but for
    ``seconds``. Raises :class:`CadisError`, writing nothing, when the parts' settings differ
    or an index has no record; a ``out_dir`` already made with other settings is refused.
    """
    out_dir = Path(out_dir)
    settings = None
    recorded: dict[int, Record] = {}
    for part in map(Path, parts):
        part_settings = read_settings(part / RECORDS_FILENAME)
        if settings is not None and part_settings != settings:
            raise CadisError(f"{part} was certified with other settings than {parts[0]}; "
                             "shards of one certification share their settings")
        settings = part_settings
        recorded.update((record.idx, record) for record in read_records(part / RECORDS_FILENAME))
    wanted = list(recorded if indices is None else dict.fromkeys(int(i) for i in indices))
    missing = [index for index in wanted if index not in recorded]
    if settings is None or missing:
        raise CadisError(f"the shards hold no record of {len(missing) or len(wanted)} of the "
                         f"{len(wanted)} images (first: {(missing or wanted)[0]})")
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir, settings)
    records = [recorded[index] for index in wanted]
    write_records(out_dir / RECORDS_FILENAME, records)
    return _summarise(out_dir, records, settings, radii, notes)
