"""Certification records and the figures derived from them (writing them: test_certifier.py)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from cadis.errors import CadisError
from cadis.smoothing.bounds import ABSTAIN
from cadis.smoothing.records import (PLOT_FILENAME, RECORDS_FILENAME, RECORDS_HEADER, SUMMARY_FILENAME,
                           Record, RecordWriter, average_certified_radius, certified_accuracy,
                           default_radii, format_table, plot_certified_accuracy, read_records,
                           write_summary)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


def hand_made_records() -> list[Record]:
    return [
        Record.from_prediction(0, label=1, predict=1, radius=0.3, seconds=1.5),
        Record.from_prediction(1, label=2, predict=2, radius=0.0, seconds=1.0),
        Record.from_prediction(2, label=0, predict=ABSTAIN, radius=0.0, seconds=2.0),
        # Wrong with a large radius: must never count.
        Record.from_prediction(3, label=3, predict=5, radius=0.9, seconds=1.0),
        Record.from_prediction(4, label=4, predict=4, radius=0.75, seconds=0.5),
    ]


# Counted by hand from hand_made_records: correct radii are 0.3, 0.0 and 0.75 of 5 images.
EXPECTED_ACCURACY = {0.0: 3 / 5, 0.25: 2 / 5, 0.5: 1 / 5, 0.75: 1 / 5, 1.0: 0.0}
EXPECTED_ACR = (0.3 + 0.0 + 0.75) / 5


def test_correct_means_prediction_equals_label_and_abstain_is_wrong():
    assert [record.correct for record in hand_made_records()] == [True, True, False, False, True]


def test_certified_accuracy_and_acr_by_hand():
    assert certified_accuracy(hand_made_records(), RADII) == pytest.approx(EXPECTED_ACCURACY)
    assert average_certified_radius(hand_made_records()) == pytest.approx(EXPECTED_ACR)


def test_radius_equal_to_the_grid_radius_counts():
    records = [Record.from_prediction(0, 1, 1, 0.25, 0.0)]
    assert certified_accuracy(records, [0.25, 0.2500001]) == {0.25: 1.0, 0.2500001: 0.0}


def test_no_records_to_summarise():
    with pytest.raises(CadisError):
        certified_accuracy([], RADII)


@pytest.mark.parametrize("scale, max_radius, expected", [
    ("cifar", None, [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("cifar", 0.6, [0.0, 0.25, 0.5]),
    ("cifar", 0.75, [0.0, 0.25, 0.5, 0.75]),
    ("imagenet", None, [0.0, 0.5, 1.0, 1.5, 2.0]),
    ("imagenet", 3.0, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
])
def test_default_radii(scale, max_radius, expected):
    assert default_radii(scale, max_radius) == expected


def test_unknown_radius_scale():
    with pytest.raises(CadisError, match="cifar, imagenet"):
        default_radii("mnist")


# --------------------------------------------------------------------------- records file


def write_records(path, records):
    with RecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def test_records_round_trip(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    write_records(path, hand_made_records()[:2])
    write_records(path, hand_made_records()[2:])
    assert path.read_text().splitlines()[0] == RECORDS_HEADER
    assert read_records(path) == hand_made_records()


def test_truncated_last_line_is_ignored_and_cut_before_appending(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    write_records(path, hand_made_records()[:3])
    with open(path, "a") as file:
        file.write("3\t3\t5\t0.")  # a crash mid-write
    assert read_records(path) == hand_made_records()[:3]
    write_records(path, hand_made_records()[3:])
    assert read_records(path) == hand_made_records()


def test_header_cut_short_reads_as_no_records(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    path.write_text("idx\tlab")
    assert read_records(path) == []
    write_records(path, hand_made_records()[:1])
    assert read_records(path) == hand_made_records()[:1]


def test_refuses_to_append_to_another_file(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    path.write_text("something\telse\n1\t2")
    with pytest.raises(CadisError, match="not a records file"):
        RecordWriter(path)
    assert path.read_text() == "something\telse\n1\t2"


@pytest.mark.parametrize("content", ["idx\tlabel\n0\t1\n", "a\tb\tc\n", "idx\tlabel\tpredict\t"
                                     "radius\tcorrect\tseconds\n0\t1\t1\tx\t1\t0.1\n"])
def test_malformed_records_file(tmp_path, content):
    path = tmp_path / RECORDS_FILENAME
    path.write_text(content)
    with pytest.raises(CadisError):
        read_records(path)


# --------------------------------------------------------------------------- summary, table, plot


def test_summary_json(tmp_path):
    path = tmp_path / SUMMARY_FILENAME
    summary = write_summary(path, hand_made_records(), RADII, sigma=0.25, n=1000, n0=100,
                            alpha=0.001, extra={"classifier": "vit", "denoiser": "ddpm"})
    on_disk = json.loads(path.read_text())
    assert on_disk == summary
    assert on_disk["certified_accuracy"] == pytest.approx(
        {"0.0": 0.6, "0.25": 0.4, "0.5": 0.2, "0.75": 0.2, "1.0": 0.0})
    assert on_disk["acr"] == pytest.approx(EXPECTED_ACR)
    assert (on_disk["sigma"], on_disk["n"], on_disk["n0"], on_disk["alpha"],
            on_disk["num_images"]) == (0.25, 1000, 100, 0.001, 5)
    assert (on_disk["classifier"], on_disk["denoiser"]) == ("vit", "ddpm")
    # Atomic: no temporary file left behind.
    assert [entry.name for entry in tmp_path.iterdir()] == [SUMMARY_FILENAME]


def test_summary_extra_may_not_overwrite_its_fields(tmp_path):
    with pytest.raises(CadisError, match="acr"):
        write_summary(tmp_path / SUMMARY_FILENAME, hand_made_records(), RADII, sigma=0.25,
                      n=10, n0=1, alpha=0.01, extra={"acr": 9.0})
    assert not (tmp_path / SUMMARY_FILENAME).exists()


def two_record_sets():
    others = [Record.from_prediction(i, 1, 1, 0.5 * i, 0.0) for i in range(4)]
    # By hand: correct radii 0, 0.5, 1.0, 1.5 -> 1, 0.75, 0.75, 0.5, 0.5 on RADII; ACR 0.75.
    return {"baseline": hand_made_records(), "ft-cadis": others}


def test_markdown_table():
    lines = format_table(two_record_sets(), RADII, "markdown").splitlines()
    assert lines[0] == "| radius | baseline | ft-cadis |"
    assert lines[1] == "|---:|---:|---:|"
    assert lines[2] == "| 0.0 | 0.600 | 1.000 |"
    assert lines[3] == "| 0.25 | 0.400 | 0.750 |"
    assert lines[6] == "| 1.0 | 0.000 | 0.500 |"
    assert lines[7] == "| ACR | 0.210 | 0.750 |"
    assert len(lines) == 2 + len(RADII) + 1


def test_csv_table():
    rows = list(csv.reader(io.StringIO(format_table(two_record_sets(), RADII, "csv"))))
    assert rows[0] == ["radius", "baseline", "ft-cadis"]
    table = {row[0]: [float(value) for value in row[1:]] for row in rows[1:]}
    assert table["0.5"] == pytest.approx([0.2, 0.75])
    assert table["0.75"] == pytest.approx([0.2, 0.5])
    assert table["ACR"] == pytest.approx([EXPECTED_ACR, 0.75])
    assert len(rows) == 1 + len(RADII) + 1


def test_unknown_table_format():
    with pytest.raises(CadisError, match="markdown, csv"):
        format_table(two_record_sets(), RADII, "latex")


def test_plot_is_a_png(tmp_path):
    path = plot_certified_accuracy(two_record_sets(), tmp_path / PLOT_FILENAME, title="test")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [entry.name for entry in tmp_path.iterdir()] == [PLOT_FILENAME]
