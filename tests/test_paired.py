"""Paired comparison of certifications (cadis/smoothing/paired.py) and `cadis analyze` on two
or more record folders: McNemar's exact test, the paired bootstrap, what may be paired."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from cadis.cli import main
from cadis.errors import CadisError
from cadis.smoothing.multiplicity import benjamini_hochberg, holm
from cadis.smoothing.paired import (
    BOOTSTRAP_RESAMPLES,
    COMPARISON_COLUMNS,
    CORRECTION_COLUMNS,
    Certification,
    aligned,
    compare,
    mcnemar_p,
    paired_bootstrap,
    paired_test,
    shared_noise,
)
from cadis.smoothing.records import (
    NOISE_PER_IMAGE,
    RECORDS_FILENAME,
    SETTINGS_FILENAME,
    Record,
    write_records,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"sigma": 0.5, "n": 100, "n0": 10, "alpha": 0.001, "dataset": "digits", "seed": 0}


def records_of(radii: list[float | None], start: int = 0, step: int = 3) -> list[Record]:
    """One record per entry, image indices ``start, start + step, ...``: a radius for a
    correct prediction, None for an abstention."""
    return [Record.from_prediction(start + step * position, label=position % 10,
                                   predict=position % 10 if radius is not None else -1,
                                   radius=radius or 0.0, seconds=0.1)
            for position, radius in enumerate(radii)]


def folder(root: Path, name: str, records: list[Record], **settings) -> Path:
    """A records folder as `cadis certify` leaves it: records.tsv and settings.json."""
    path = root / name
    path.mkdir()
    write_records(path / RECORDS_FILENAME, records)
    (path / SETTINGS_FILENAME).write_text(json.dumps({**SETTINGS, **settings}))
    return path


# Hand-made: at radius 0.5, A certifies images 0-7 and 10-11, B certifies 8-11 (and A's
# abstentions at 8-9): 8 images only A's, 2 only B's, 2 both, 1 neither.
HAND_A = [0.6] * 8 + [None, None, 0.9, 0.7, None]
HAND_B = [0.1] * 8 + [0.8, 0.55, 0.9, 0.7, None]


def test_mcnemar_on_a_hand_made_case_against_scipy_and_by_hand():
    result = paired_test(records_of(HAND_A), records_of(HAND_B), 0.5)
    assert (result.only_a, result.only_b, result.images) == (8, 2, 13)
    assert (result.accuracy_a, result.accuracy_b) == pytest.approx((10 / 13, 4 / 13))
    # Two-sided exact binomial of 2 in 10: 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10.
    assert result.p_value == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert result.p_value == pytest.approx(2 * (1 + 10 + 45) / 1024)


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (1, 0), (3, 3), (0, 7), (12, 30)])
def test_mcnemar_p_is_scipys_two_sided_binomial(only_a, only_b):
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b).pvalue
    assert mcnemar_p(only_a, only_b) == pytest.approx(expected)


def test_identical_records_differ_by_nothing_with_p_one():
    records = records_of(HAND_A)
    comparison = compare(records, list(reversed(records)), [0.0, 0.5, 1.0])
    assert all(test.only_a == test.only_b == 0 and test.p_value == 1.0
               for test in comparison.tests)
    assert all(interval == (0.0, 0.0) for interval in comparison.intervals)
    assert comparison.acr_a == comparison.acr_b and comparison.acr_interval == (0.0, 0.0)


def _difference_case(copies: int) -> tuple[np.ndarray, np.ndarray]:
    # 40 images: A certifies 24, B 18, 10 of them A's only and 4 B's only.
    a = np.array([1] * 20 + [1] * 4 + [0] * 4 + [0] * 12, dtype=float)
    b = np.array([1] * 14 + [0] * 6 + [0] * 4 + [1] * 4 + [0] * 12, dtype=float)
    return np.tile(a, copies)[:, None], np.tile(b, copies)[:, None]


def test_bootstrap_interval_holds_the_difference_is_seeded_and_narrows_with_images():
    a, b = _difference_case(1)
    observed = float((a - b).mean())
    (low,), (high,) = paired_bootstrap(a, b)
    assert low < observed < high
    # Radii rather than 0/1 outcomes, so that another seed moves the quantiles off the grid
    # of multiples of 1/40 the outcomes' means lie on.
    radii_a, radii_b = np.random.default_rng(5).random((2, 40, 1))
    again = paired_bootstrap(radii_a, radii_b)
    assert np.array_equal(again, paired_bootstrap(radii_a, radii_b, seed=0))
    assert not np.array_equal(again, paired_bootstrap(radii_a, radii_b, seed=1))
    (wide_low,), (wide_high,) = paired_bootstrap(*_difference_case(9))
    assert wide_low < observed < wide_high
    # Nine times the images: about a third of the width (the standard error's 1/sqrt(9)).
    assert (wide_high - wide_low) < 0.45 * (high - low)


def test_bootstrap_resamples_in_blocks_as_one_draw(monkeypatch):
    # The block size only bounds memory: a resample is a resample whatever the block.
    a, b = _difference_case(1)
    whole = paired_bootstrap(a, b, resamples=300)
    monkeypatch.setattr("cadis.smoothing.paired.RESAMPLE_BLOCK_CELLS", 40 * 7)
    blocked = paired_bootstrap(a, b, resamples=300)
    assert np.array_equal(whole, blocked)
    assert BOOTSTRAP_RESAMPLES == 10_000


def test_other_image_sets_are_refused_saying_how_they_differ():
    a, b = records_of(HAND_A), records_of(HAND_B)
    with pytest.raises(CadisError, match="A has 13 images, B 12; 12 in common"):
        aligned(a, b[:-1])
    with pytest.raises(CadisError, match="B records image 0 more than once"):
        aligned(a, [*b[:-1], b[0]])
    relabelled = [*b[:-1], Record.from_prediction(b[-1].idx, 7, 7, 0.1, 0.1)]
    with pytest.raises(CadisError, match="different labels"):
        aligned(a, relabelled)


# --------------------------------------------------------------------------- cadis analyze


def _analyze(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze_pairs_two_folders_in_markdown_and_plots(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A), noise=NOISE_PER_IMAGE)
    b = folder(tmp_path, "b", records_of(HAND_B), noise=NOISE_PER_IMAGE)
    plot = tmp_path / "paired.png"
    code, out, _ = _analyze(capsys, a, b, "--labels", "first", "second", "--baseline", "second",
                            "--radii", "0,0.5", "--plot", plot)
    assert code == 0
    caption = "13 digits test images (idx 0 to 36, step 3); n = 100, n0 = 10, alpha = 0.001, " \
              "sigma = 0.5"
    # Both tables are labelled with the images and the settings.
    assert out.count(caption) == 2
    assert "| radius | first − second | 95% interval | only first | only second | p |" in out
    assert "| 0.5 | +0.462 | " in out and f"| 8 | 2 | {2 * 56 / 1024:.3f} |" in out
    assert "noise draws the same for each image (seed 0" in out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


def test_analyze_pairs_in_csv_each_row_naming_what_made_it(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A), seed=1, noise=NOISE_PER_IMAGE)
    b = folder(tmp_path, "b", records_of(HAND_B), noise=NOISE_PER_IMAGE)
    c = folder(tmp_path, "c", records_of(HAND_A))
    code, out, _ = _analyze(capsys, a, b, c, "--format", "csv", "--radii", "0,0.5")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == list(COMPARISON_COLUMNS)
    assert [(row["label"], row["radius"]) for row in rows] == [
        (str(b), "0.0"), (str(b), "0.5"), (str(b), "ACR"),
        (str(c), "0.0"), (str(c), "0.5"), (str(c), "ACR")]
    assert {(row["images"], row["idx"], row["n"], row["n0"], row["alpha"], row["sigma"])
            for row in rows} == {("13", "idx 0 to 36, step 3", "100", "10", "0.001", "0.5")}
    # Other seeds, and settings that do not say the noise was per image: independent draws.
    assert {row["same_noise"] for row in rows} == {"false"}
    assert float(rows[1]["difference"]) == pytest.approx(-6 / 13, abs=1e-6)
    assert float(rows[3]["difference"]) == 0.0 and float(rows[3]["p_value"]) == 1.0


def test_analyze_of_one_file_is_just_its_table(tmp_path, capsys):
    records = tmp_path / "alone.tsv"  # no settings.json: one file needs none
    write_records(records, records_of(HAND_A))
    code, out, _ = _analyze(capsys, records, "--radii", "0,0.5")
    assert code == 0
    assert out.splitlines()[0] == f"| radius | {records} |" and len(out.splitlines()) == 5


def test_unpaired_puts_other_settings_side_by_side(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A))
    b = folder(tmp_path, "b", records_of(HAND_B), sigma=0.25)
    code, out, _ = _analyze(capsys, a, b, "--unpaired", "--radii", "0")
    assert code == 0 and out.splitlines()[0] == f"| radius | {a} | {b} |"


@pytest.mark.parametrize("change,fragment", [
    ({"records": records_of(HAND_B[:-1])}, "has 13 images, "),
    ({"records": records_of(HAND_B, start=1)}, "; 0 in common"),
    ({"sigma": 0.25}, "sigma 0.5 in "),
    ({"n": 200}, "n 100 in "),
    ({"n0": 20}, "n0 10 in "),
    ({"alpha": 0.01}, "alpha 0.001 in "),
    ({"dataset": "cifar10"}, "images of digits test and cifar10 test"),
    ({"split": "validation"}, "images of digits test and digits validation"),
])
def test_analyze_refuses_to_pair_in_one_line(tmp_path, capsys, change, fragment):
    a = folder(tmp_path, "a", records_of(HAND_A))
    b = folder(tmp_path, "b", change.pop("records", records_of(HAND_B)), **change)
    code, out, err = _analyze(capsys, a, b, "--plot", tmp_path / "never.png")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("cadis: error: ") and fragment in err
    assert str(a) in err and str(b) in err and "Traceback" not in err
    assert not (tmp_path / "never.png").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--baseline", "nobody"], "--baseline 'nobody' is none of the labels"),
    (["--labels", "same", "same"], "each records file needs its own label"),
])
def test_analyze_bad_reference_or_labels(tmp_path, capsys, args, fragment):
    a = folder(tmp_path, "a", records_of(HAND_A))
    b = folder(tmp_path, "b", records_of(HAND_B))
    code, _, err = _analyze(capsys, a, b, *args)
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_pairing_needs_the_settings_beside_the_records(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A))
    bare = tmp_path / "bare.tsv"
    write_records(bare, records_of(HAND_B))
    code, _, err = _analyze(capsys, a, bare)
    assert code == 2 and f"{bare} has no settings.json beside it" in err


def test_a_sequential_record_set_is_paired_but_its_acr_is_not_compared(tmp_path, capsys):
    # Sequential records hold grid radii, so their ACR is over the grid: not a fixed-n ACR.
    fixed = records_of(HAND_A)
    sequential = [Record(r.idx, r.label, r.predict, 0.5 if r.radius >= 0.5 else 0.0, r.correct,
                         r.seconds, draws=50) for r in fixed]
    a, b = folder(tmp_path, "a", fixed), folder(tmp_path, "b", sequential, mode="sequential")
    code, out, _ = _analyze(capsys, a, b, "--radii", "0,0.5")
    assert code == 0 and "| ACR | n/a: one is sequential (its ACR is over the grid) |" in out
    assert "| 0.5 | +0.000 | [+0.000, +0.000] | 0 | 0 | 1.000 |" in out
    code, out, _ = _analyze(capsys, a, b, "--radii", "0,0.5", "--format", "csv")
    assert [row["radius"] for row in csv.DictReader(io.StringIO(out))] == ["0.0", "0.5"]


def test_analyze_corrects_every_p_value_of_the_run_as_one_family(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A))
    b = folder(tmp_path, "b", records_of(HAND_B))
    c = folder(tmp_path, "c", records_of(HAND_A[:-1] + [0.3]))
    args = (a, b, c, "--labels", "A", "B", "C", "--radii", "0,0.5")
    _, plain, _ = _analyze(capsys, *args)
    _, plain_csv, _ = _analyze(capsys, *args, "--format", "csv")
    raw = [float(row["p_value"]) for row in csv.DictReader(io.StringIO(plain_csv))
           if row["radius"] != "ACR"]
    for correction, adjust_family in (("holm", holm), ("bh", benjamini_hochberg)):
        code, out, _ = _analyze(capsys, *args, "--correct", correction, "--format", "csv")
        rows = list(csv.DictReader(io.StringIO(out)))
        assert code == 0 and list(rows[0]) == [*COMPARISON_COLUMNS, *CORRECTION_COLUMNS]
        tested = [row for row in rows if row["radius"] != "ACR"]
        # The raw p-values stay; the adjusted ones are the family's: 2 radii x 2 sets.
        assert [float(row["p_value"]) for row in tested] == raw
        assert [float(row["p_adjusted"]) for row in tested] == pytest.approx(
            list(adjust_family(raw)), rel=1e-5)
        assert {(row["correction"], row["family_size"]) for row in tested} == {
            (correction, "4")}
        assert all(row["p_adjusted"] == "" for row in rows if row["radius"] == "ACR")
    code, out, _ = _analyze(capsys, *args, "--correct", "holm")
    assert code == 0 and out.splitlines()[0] == (
        "p-values adjusted by Holm (family-wise error rate) over one family of 4 tests: all 2 "
        "radii x 2 compared sets of this run.")
    assert "| radius | B − A | 95% interval | only B | only A | p | Holm p |" in out
    assert f"| 8 | {2 * 56 / 1024:.3f} | {min(1.0, 4 * 2 * 56 / 1024):.3f} |" in out
    # The side-by-side table is what the uncorrected run printed.
    assert plain[:plain.index("B against A")] in out


@pytest.mark.parametrize("args,fragment", [
    (["--correct", "bonferroni"], "--correct must be one of holm, bh, got 'bonferroni'"),
    (["--correct", "holm", "--unpaired"], "--correct adjusts the p-values of a paired "
                                          "comparison"),
])
def test_analyze_refuses_another_correction_in_one_line(tmp_path, capsys, args, fragment):
    a = folder(tmp_path, "a", records_of(HAND_A))
    b = folder(tmp_path, "b", records_of(HAND_B))
    code, out, err = _analyze(capsys, a, b, *args)
    assert code == 2 and out == "" and fragment in err and err.count("\n") == 1


MODELS = {"classifier": "a" * 64, "denoiser": "b" * 64}


def test_analyze_refuses_records_made_on_other_models_in_one_line(tmp_path, capsys):
    a = folder(tmp_path, "a", records_of(HAND_A), model_hashes=MODELS)
    b = folder(tmp_path, "b", records_of(HAND_B), model_hashes={**MODELS, "denoiser": "c" * 64})
    code, out, err = _analyze(capsys, a, b, "--plot", tmp_path / "never.png")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert ("cannot pair records made on other models (denoiser sha256 bbbbbbbbbbbb in "
            f"{a / RECORDS_FILENAME}, cccccccccccc in {b / RECORDS_FILENAME})") in err
    assert "classifier" not in err and not (tmp_path / "never.png").exists()


def test_analyze_pairs_one_pair_silently_and_warns_once_where_hashes_are_missing(tmp_path,
                                                                                 capsys):
    a = folder(tmp_path, "a", records_of(HAND_A), model_hashes=MODELS)
    b = folder(tmp_path, "b", records_of(HAND_B), model_hashes=dict(MODELS))
    code, out, err = _analyze(capsys, a, b, "--radii", "0")
    assert code == 0 and "| 0 | " in out and err == ""
    # Old records name no hashes; a model named, not held as files, has none: paired, said.
    old = folder(tmp_path, "old", records_of(HAND_B))
    named = folder(tmp_path, "named", records_of(HAND_B),
                   model_hashes={**MODELS, "classifier": None})
    code, out, err = _analyze(capsys, a, old, named, "--radii", "0")
    assert code == 0 and "| 0 | " in out and err.count("\n") == 1
    assert err.startswith(f"cadis: warning: the settings of {old}, {named} name no sha256")
    assert f"{a}," not in err


COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results"
# Every training seed's test records of each science table's chosen trials, by sigma: the
# search's own training, then the final stage's two further seeds.
SEED_FOLDERS = ("", "seeds/1/", "seeds/2/")
SCIENCE_SEEDS = {
    sigma: [f"{arm}/trials/{trial}/{seed}certify" for arm, trial in chosen
            for seed in SEED_FOLDERS]
    for sigma, chosen in (("0.5", (("ft_cadis", "d8ffca00"), ("denoised_ce", "1aad0adc"))),
                          ("0.25", (("ft_cadis", "2d9975f1"), ("denoised_ce", "4a6077e0"))))
}


def _committed(path: str) -> Certification:
    return Certification.read(path, COMMITTED / path / RECORDS_FILENAME)


def test_committed_science_records_read_one_store_of_test_draws():
    # Each science table's records, the off-the-shelf pair's and every seed's, read one store
    # of test draws: they pair draw for draw.
    for sigma, seeds in SCIENCE_SEEDS.items():
        pair = _committed(f"science-sigma{sigma}/off_the_shelf")
        key = pair.settings["stored_draws"].rsplit("/", 1)[-1]
        for seed in seeds:
            assert shared_noise(pair, _committed(f"science-sigma{sigma}/{seed}")) == (
                True, f"the same for each image (stored draws {key})")
    # The first baseline names no scheme: independent of everything.
    same, why = shared_noise(_committed("baseline-sigma0.5"), pair)
    assert not same and "baseline-sigma0.5 name no per-image noise scheme" in why


def _made(tmp_path: Path, name: str, **settings) -> Certification:
    path = folder(tmp_path, name, records_of(HAND_A), **settings)
    return Certification.read(name, path / RECORDS_FILENAME)


def test_shared_noise_needs_one_scheme_and_one_seed_or_one_store_key(tmp_path):
    now = _made(tmp_path, "now", noise=NOISE_PER_IMAGE)
    assert shared_noise(now, _made(tmp_path, "again", noise=NOISE_PER_IMAGE))[0]
    older = _made(tmp_path, "older", noise="per-image generators")
    # An older scheme pairs with itself at one seed: it drew the same noise for each image.
    assert shared_noise(older, _made(tmp_path, "older_too", noise="per-image generators")) == (
        True, "the same for each image (seed 0, per-image generators)")
    assert shared_noise(now, older) == (
        False, f"independent: noise schemes differ ({NOISE_PER_IMAGE!r}, "
               f"'per-image generators')")
    assert shared_noise(now, _made(tmp_path, "seeded", noise=NOISE_PER_IMAGE, seed=1)) == (
        False, "independent: seeds 0 and 1")
    # A store's folder name is its key's digest: the same name wherever it lies is one key.
    stored = _made(tmp_path, "stored", noise=NOISE_PER_IMAGE,
                   stored_draws="/a/test-0123456789ab")
    assert shared_noise(stored, _made(tmp_path, "moved", stored_draws="/b/test-0123456789ab"))[0]
    # Another store of today's scheme and seed still draws the same noise per image.
    assert shared_noise(stored, _made(tmp_path, "other", noise=NOISE_PER_IMAGE,
                                      stored_draws="/a/test-ba9876543210"))[0]
    older_store = _made(tmp_path, "old", stored_draws="/a/rank-ba9876543210")
    assert not shared_noise(stored, older_store)[0]
