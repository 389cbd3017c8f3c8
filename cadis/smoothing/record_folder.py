"""A folder of certification records that can be resumed: claimed, summarised, joined.

The folder holds ``settings.json`` (what the records were made with), ``records.tsv`` (one
row per certified image, appended as it goes), and, derived from the records,
``summary.json`` and ``certified_accuracy.png``. A folder made with other settings is
refused rather than mixing two experiments in one file. The certifier
(:mod:`cadis.certifier`) writes the records; shards' folders are joined here
(:func:`merge_records`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cadis.errors import CadisError
from cadis.files import atomic_write_text
from cadis.smoothing.records import (
    CERTIFICATION_SETTINGS,
    PLOT_FILENAME,
    RECORDS_FILENAME,
    SETTINGS_FILENAME,
    SUMMARY_FIELDS,
    SUMMARY_FILENAME,
    Record,
    average_certified_radius,
    plot_certified_accuracy,
    read_records,
    read_settings,
    write_records,
    write_summary,
)
from cadis.smoothing.sequential import MODE_FIXED, MODE_SEQUENTIAL


def _as_json(value: Any) -> Any:
    # What the value becomes once written to settings.json and read back: the form in which
    # the settings of two runs are compared.
    return json.loads(json.dumps(value, default=str))


def complete_settings(settings: Mapping[str, Any], *, sigma: float, n: int, n0: int,
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


def claim_record_folder(out_dir: Path, settings: dict[str, Any]) -> None:
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


def summarise_records(out_dir: Path, records: list[Record], run_settings: Mapping[str, Any],
                      radii: Sequence[float],
                      notes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Write ``summary.json`` (the settings and ``notes`` among its fields) and the plot of
    ``records``, made with ``run_settings``."""
    sigma, n, n0, alpha = (run_settings[key] for key in CERTIFICATION_SETTINGS)
    sequential = run_settings.get("mode") == MODE_SEQUENTIAL
    extra = {key: value for key, value in {**run_settings, **(notes or {})}.items()
             if key not in CERTIFICATION_SETTINGS}
    extra["mode"] = MODE_SEQUENTIAL if sequential else MODE_FIXED
    # Sequential records hold grid radii: their ACR is an average over the grid, named so
    # (``acr_grid``) beside ``acr``; a continuous ACR needs fixed n.
    extra["acr_over"] = "grid" if sequential else "radius"
    if sequential:
        extra["acr_grid"] = average_certified_radius(records)
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
    the order of the parts) into ``out_dir`` and summarise it as
    :func:`cadis.certifier.certify_into` would have.

    The records are written in the order of ``indices``, so with per-image noise
    (:class:`cadis.certifier.LiveDraws` with a seed) or stored draws the file equals a single
    run's but for ``seconds``. Raises :class:`CadisError`, writing nothing, when the parts'
    settings differ or an index has no record; a ``out_dir`` already made with other
    settings is refused.
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
    claim_record_folder(out_dir, settings)
    records = [recorded[index] for index in wanted]
    write_records(out_dir / RECORDS_FILENAME, records)
    return summarise_records(out_dir, records, settings, radii, notes)
