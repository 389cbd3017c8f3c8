"""Per-image certification records and everything derived from them.

The records (``records.tsv``: index, label, prediction, radius, correct, seconds) are the raw
output of a certification; certified accuracy, ACR, ``summary.json``, tables and plots are
computed from them, never the other way round. Result files are written atomically (a
temporary file, then ``os.replace``), so a reader never sees half of one; the records file is
appended one flushed line at a time and survives a crash mid-line.

Torch-free: ``cadis analyze`` and ``cadis compare`` read records and draw tables without
importing torch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from cadis.errors import CadisError
from cadis.files import atomic_write_bytes, atomic_write_text
from cadis.smoothing.bounds import ABSTAIN, max_certifiable_radius

RECORDS_FILENAME: Final = "records.tsv"
SUMMARY_FILENAME: Final = "summary.json"
PLOT_FILENAME: Final = "certified_accuracy.png"
#: What made the records beside it (written by cadis.smoothing.record_folder before any record).
SETTINGS_FILENAME: Final = "settings.json"
#: ``settings["noise"]`` (and a store key's) when each image has its own seeded noise
#: (cadis.smoothing.image_noise), naming its scheme: records and stores of another scheme
#: ("per-image generators": one generator per index, whatever the split, drawn in the batches
#: asked for) drew other noise, so they are never taken for these, and a store of theirs is
#: another key. Here, torch-free, so that a reader of records can tell from the settings
#: whether two runs drew the same noise.
NOISE_PER_IMAGE: Final = "per-image streams by split, selection and estimation, blocks of 10"

RECORD_COLUMNS: Final = ("idx", "label", "predict", "radius", "correct", "seconds")
RECORDS_HEADER: Final = "\t".join(RECORD_COLUMNS)
#: Sequential certification's records (cadis.smoothing.sequential) add the draws each image
#: spent; their header differs, so the two kinds never share a file.
SEQUENTIAL_COLUMNS: Final = (*RECORD_COLUMNS, "draws")
SEQUENTIAL_HEADER: Final = "\t".join(SEQUENTIAL_COLUMNS)
HEADERS: Final = {RECORDS_HEADER: RECORD_COLUMNS, SEQUENTIAL_HEADER: SEQUENTIAL_COLUMNS}

#: Radius grids of the papers' tables: step and default largest radius per image scale.
RADIUS_STEPS: Final = {"cifar": 0.25, "imagenet": 0.5}
DEFAULT_MAX_RADII: Final = {"cifar": 1.0, "imagenet": 2.0}
#: Images larger than this are certified on the ImageNet-scale radius grid (0, 0.5, 1, ...).
CIFAR_SCALE_MAX_SIZE: Final = 64

#: The settings that the certification itself fixes (the record folder's caller must agree
#: with them); records made with other values of these are other experiments.
CERTIFICATION_SETTINGS: Final = ("sigma", "n", "n0", "alpha")
#: The summary's own fields; extra fields may not reuse these names.
SUMMARY_FIELDS: Final = (*CERTIFICATION_SETTINGS, "num_images", "certified_accuracy", "acr")

#: Points of the radius grid a certified-accuracy curve is drawn on.
PLOT_GRID_POINTS: Final = 1000
#: The curves run this much past the largest radius so that their last drop shows.
PLOT_MARGIN: Final = 1.05

TableFormat = Literal["markdown", "csv"]
TABLE_FORMATS: Final = ("markdown", "csv")
MARKDOWN_DIGITS: Final = 3
CSV_DIGITS: Final = 6


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One certified image: its prediction (``ABSTAIN`` = -1) and certified l2 radius.

    ``correct`` is ``predict == label``; an abstention is never correct. ``draws`` is what a
    sequential certification spent on the image (None for fixed n: always n0 + n).
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: bool
    seconds: float
    draws: int | None = None

    @classmethod
    def from_prediction(cls, idx: int, label: int, predict: int, radius: float,
                        seconds: float, draws: int | None = None) -> Record:
        return cls(int(idx), int(label), int(predict), float(radius),
                   predict != ABSTAIN and predict == label, float(seconds),
                   None if draws is None else int(draws))

    def to_line(self) -> str:
        # repr keeps the radius exact, so accuracy at a grid radius is the same read back.
        fields = [str(self.idx), str(self.label), str(self.predict), repr(self.radius),
                  str(int(self.correct)), f"{self.seconds:.4f}"]
        return "\t".join(fields if self.draws is None else [*fields, str(self.draws)])

    @classmethod
    def from_line(cls, line: str, where: str, columns: tuple[str, ...] = RECORD_COLUMNS
                  ) -> Record:
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise CadisError(f"{where}: expected {len(columns)} tab-separated fields "
                             f"({', '.join(columns)}), got {len(fields)}")
        idx, label, predict, radius, correct, seconds = fields[:len(RECORD_COLUMNS)]
        try:
            if correct not in ("0", "1"):
                raise ValueError(f"correct must be 0 or 1, got {correct!r}")
            draws = int(fields[-1]) if len(columns) > len(RECORD_COLUMNS) else None
            return cls(int(idx), int(label), int(predict), float(radius), correct == "1",
                       float(seconds), draws)
        except ValueError as error:
            raise CadisError(f"{where}: malformed record ({error})") from None


def _prepare_for_append(path: Path, expected: str) -> None:
    """Cut a last line left without its newline by a crash, and check the header is
    ``expected``, so that appended rows start on lines of their own in a file of records of
    one kind."""
    if not path.exists():
        return
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete:
        header = data[:data.find(b"\n")].decode("utf-8", errors="replace")
        if header != expected:
            raise CadisError(f"{path} is not a records file of this kind (header {header!r}, "
                             f"expected {expected!r}); refusing to append to it")
    if complete < len(data):
        os.truncate(path, complete)


class RecordWriter:
    """Appends :class:`Record` rows to a records file, each line flushed as it is written.

    A new or empty file gets the header first. A last line that a crash cut short is removed
    on opening; complete rows already there are kept. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, sequential: bool = False) -> None:
        self.path = Path(path)
        header = SEQUENTIAL_HEADER if sequential else RECORDS_HEADER
        _prepare_for_append(self.path, header)
        self._file = open(self.path, "a", encoding="utf-8", newline="\n")
        if self._file.tell() == 0:
            self._file.write(header + "\n")
            self._file.flush()

    def write(self, record: Record) -> None:
        self._file.write(record.to_line() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_records(path: str | os.PathLike, records: Sequence[Record]) -> None:
    """Write ``records`` as a whole records file at ``path``, atomically (a reader sees the old
    file or the new one, never part of it)."""
    _require_records(records)
    header = SEQUENTIAL_HEADER if records[0].draws is not None else RECORDS_HEADER
    atomic_write_text(path, "".join(f"{line}\n" for line in
                                    [header, *(record.to_line() for record in records)]))


def read_records(path: str | os.PathLike) -> list[Record]:
    """The complete records of a records file, in file order.

    A last line without its newline (a crash mid-write) is ignored; any other malformed line,
    a wrong header or a missing file raises :class:`CadisError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CadisError(f"no records file at {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise CadisError(f"{path} is not a records file (not text)") from None
    # The last piece is "" after a final newline, else a line cut short: dropped either way.
    complete = lines[:-1]
    if not complete:
        # A header cut short by a crash holds no records; anything else is another file.
        if not any(header.startswith(lines[0]) for header in HEADERS):
            raise CadisError(f"{path} is not a records file (it starts {lines[0][:40]!r})")
        return []
    columns = HEADERS.get(complete[0])
    if columns is None:
        raise CadisError(f"{path} is not a records file (header {complete[0]!r}, expected "
                         f"{RECORDS_HEADER!r} or {SEQUENTIAL_HEADER!r})")
    return [Record.from_line(line, f"{path}:{number}", columns)
            for number, line in enumerate(complete[1:], start=2)]


def read_settings(records_path: str | os.PathLike) -> dict[str, Any]:
    """The ``settings.json`` beside a records file: what its records were made with.

    Raises :class:`CadisError` when it is missing, not JSON or not an object.
    """
    path = Path(records_path).parent / SETTINGS_FILENAME
    if not path.is_file():
        raise CadisError(f"{records_path} has no {SETTINGS_FILENAME} beside it, so what made "
                         "its records is unknown")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CadisError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise CadisError(f"{path} is not a JSON object of settings")
    return settings


# --------------------------------------------------------------------------- metrics


def _require_records(records: Sequence[Record]) -> None:
    if not records:
        raise CadisError("no certification records to summarise")


def certified_accuracy_curve(records: Sequence[Record], radii: Sequence[float] | np.ndarray
                             ) -> np.ndarray:
    """Certified accuracy at each radius: the fraction of records that are correct with a
    radius >= r (abstentions and wrong predictions never count)."""
    _require_records(records)
    certified = np.sort([record.radius if record.correct else -math.inf
                         for record in records])
    at_least = len(certified) - np.searchsorted(certified, np.asarray(radii, dtype=float),
                                                side="left")
    return at_least / len(certified)


def certified_accuracy(records: Sequence[Record], radii: Sequence[float]) -> dict[float, float]:
    """``{r: certified accuracy at r}`` for each radius of ``radii`` (see
    :func:`certified_accuracy_curve`)."""
    curve = certified_accuracy_curve(records, radii)
    return {float(radius): float(value) for radius, value in zip(radii, curve)}


def average_certified_radius(records: Sequence[Record]) -> float:
    """ACR: the mean over all records of the radius if correct, else 0."""
    _require_records(records)
    return sum(record.radius for record in records if record.correct) / len(records)


def default_radii(scale: Literal["cifar", "imagenet"],
                  max_radius: float | None = None) -> list[float]:
    """The table's radius grid: 0, 0.25, 0.5, ... ("cifar") or 0, 0.5, 1.0, ... ("imagenet"),
    up to and including ``max_radius`` (default 1.0 and 2.0, the papers' tables)."""
    if scale not in RADIUS_STEPS:
        raise CadisError(f"radius scale must be one of {', '.join(RADIUS_STEPS)}, got {scale!r}")
    limit = DEFAULT_MAX_RADII[scale] if max_radius is None else max_radius
    if not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 0):
        raise CadisError(f"max_radius must be a finite number >= 0, got {max_radius!r}")
    step = RADIUS_STEPS[scale]
    # Multiples of an exact binary step: no accumulated rounding; the small slack keeps a
    # max_radius computed as, say, 3 * 0.25 on the grid.
    return [index * step for index in range(int(math.floor(limit / step + 1e-9)) + 1)]


def radius_grid(sigma: float, n: int, alpha: float, image_size: int,
                radii: Sequence[float] | None = None) -> list[float]:
    """The table's radii: given ones, else the scale's grid up to what ``n`` can certify."""
    if radii:
        if any(r < 0 for r in radii):
            raise CadisError(f"radii must be >= 0, got {list(radii)}")
        return sorted(set(float(r) for r in radii))
    scale = "cifar" if image_size <= CIFAR_SCALE_MAX_SIZE else "imagenet"
    # Up to the reach, not a step beyond it (default_radii stops on the grid below it): a
    # radius beyond is certified by no image, whatever the model, and a column of zeros
    # there says nothing but n.
    return default_radii(scale, max_radius=max(max_certifiable_radius(sigma, n, alpha), 0.0))


def radius_key(radius: float) -> str:
    """How a radius names a certified-accuracy entry in JSON: "0.0", "0.25", "1.5"."""
    return str(float(radius))


# --------------------------------------------------------------------------- summaries


def summarize(records: Sequence[Record], radii: Sequence[float], *, sigma: float, n: int,
              n0: int, alpha: float, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a certification: its settings, ``num_images``, ``certified_accuracy``
    keyed by :func:`radius_key`, ``acr``, then the ``extra`` fields (model identities, ...).

    Raises :class:`CadisError` if an extra field reuses one of :data:`SUMMARY_FIELDS`.
    """
    extra = dict(extra or {})
    clashing = sorted(set(extra) & set(SUMMARY_FIELDS))
    if clashing:
        raise CadisError(f"extra summary fields may not be named {', '.join(clashing)}")
    accuracy = certified_accuracy(records, radii)
    return {"sigma": float(sigma), "n": int(n), "n0": int(n0), "alpha": float(alpha),
            "num_images": len(records),
            "certified_accuracy": {radius_key(radius): value for radius, value in accuracy.items()},
            "acr": average_certified_radius(records), **extra}


def write_summary(path: str | os.PathLike, records: Sequence[Record], radii: Sequence[float],
                  *, sigma: float, n: int, n0: int, alpha: float,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write :func:`summarize`'s dict as JSON to ``path``, atomically, and return it."""
    summary = summarize(records, radii, sigma=sigma, n=n, n0=n0, alpha=alpha, extra=extra)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------- tables and plots


#: What a table's column adds to the label of sequentially made records.
SEQUENTIAL_LABEL: Final = "(sequential; ACR over the grid)"


def is_sequential(records: Sequence[Record]) -> bool:
    """Whether records were made by sequential certification (they carry draws spent)."""
    return bool(records) and records[0].draws is not None


def format_table(record_sets: Mapping[str, Sequence[Record]], radii: Sequence[float],
                 fmt: TableFormat = "markdown") -> str:
    """Certified accuracy of each labelled record set side by side: one row per radius, one
    column per label, and a last row ``ACR``. Accuracies are fractions in [0, 1]. A record
    set made sequentially says so in its column (its ACR is an average over the grid)."""
    if not record_sets:
        raise CadisError("no record sets to tabulate")
    labels = [f"{label} {SEQUENTIAL_LABEL}" if is_sequential(records) else label
              for label, records in record_sets.items()]
    record_sets = dict(zip(labels, record_sets.values()))
    curves = [certified_accuracy_curve(record_sets[label], radii) for label in labels]
    acrs = [average_certified_radius(record_sets[label]) for label in labels]
    digits = MARKDOWN_DIGITS if fmt == "markdown" else CSV_DIGITS
    rows = [[radius_key(radius), *(f"{curve[row]:.{digits}f}" for curve in curves)]
            for row, radius in enumerate(radii)]
    rows.append(["ACR", *(f"{acr:.{digits}f}" for acr in acrs)])
    return render_table(["radius", *labels], rows, fmt)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], fmt: TableFormat,
                 text_columns: int = 0) -> str:
    """Cells as a CSV or a markdown pipe table whose first ``text_columns`` columns are
    left-aligned and the others (numbers) right-aligned; ``|`` in a cell is escaped."""
    if fmt not in TABLE_FORMATS:
        raise CadisError(f"table format must be one of {', '.join(TABLE_FORMATS)}, got {fmt!r}")
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()

    def markdown_row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    return "\n".join([markdown_row(header), rule, *map(markdown_row, rows)]) + "\n"


def plot_certified_accuracy(record_sets: Mapping[str, Sequence[Record]],
                            path: str | os.PathLike, title: str | None = None) -> Path:
    """Save certified accuracy vs radius, one step curve per labelled record set, as a PNG.

    The curves are exact on a fine grid up to a little past the largest certified radius of
    any set. Rendering uses matplotlib's Agg canvas (no display, no pyplot state); the file
    is written atomically.
    """
    from matplotlib.figure import Figure

    if not record_sets:
        raise CadisError("no record sets to plot")
    figure = Figure(figsize=(6.0, 4.0))
    axes = figure.add_subplot()
    draw_certified_accuracy(axes, record_sets)
    if title:
        axes.set_title(title)
    return save_png(figure, path)


def draw_certified_accuracy(axes: Any, record_sets: Mapping[str, Sequence[Record]]) -> None:
    """Draw :func:`plot_certified_accuracy`'s curves, axes and legend on matplotlib ``axes``."""
    largest = max((record.radius for records in record_sets.values() for record in records
                   if record.correct), default=0.0)
    # With nothing certified beyond 0, still show a unit of radius so the axes make sense.
    grid = np.linspace(0.0, largest * PLOT_MARGIN if largest > 0 else 1.0, PLOT_GRID_POINTS)
    for label, records in record_sets.items():
        axes.plot(grid, certified_accuracy_curve(records, grid), label=label,
                  drawstyle="steps-post")
    axes.set_xlabel("radius (l2)")
    axes.set_ylabel("certified accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.set_xlim(0.0, grid[-1])
    axes.grid(alpha=0.3)
    axes.legend()


def save_png(figure: Any, path: str | os.PathLike) -> Path:
    """Render a matplotlib ``Figure`` on the Agg canvas and write it to ``path`` as a PNG,
    atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
