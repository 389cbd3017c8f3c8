"""`cadis compare`: trial runs read back from a real (SQLite) MLflow store, tabulated and
plotted."""

from __future__ import annotations

import argparse
import csv
import io
import math

import pytest

from cadis.cli import main
from cadis.tracking import contract as tracking
from cadis.tracking.server import TRACKING_URI_ENV
from cadis.tracking.compare import (
    ablation_series,
    format_trial_table,
    plot_ablation,
    plot_curves,
    reachable_points,
    run_compare,
    value_key,
)
from cadis.tracking.sweep_reader import TrialRow, load_trials
from cadis.errors import CadisError
from cadis.smoothing.bounds import max_certifiable_radius

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "ablation"
BY = "confidence_threshold"
RADII = (0.0, 0.25, 0.5)

# Trials of sweep A in the order they start: name -> (threshold, outcome, final metrics).
# trial_3 was stopped early: per-epoch metrics only, no certified accuracy.
SWEEP_A = {
    "trial_0": ("argmax", "completed", {"r": (0.70, 0.55, 0.30), "acr": 0.40,
                                        "clean_accuracy": 0.70}),
    "trial_1": ("0.5", "completed", {"r": (0.80, 0.60, 0.35), "acr": 0.45,
                                     "clean_accuracy": 0.80}),
    "trial_2": ("0.0", "completed", {"r": (0.60, 0.50, 0.25), "acr": 0.35,
                                     "clean_accuracy": 0.60}),
    "trial_3": ("0.5", "stopped_early", None),
}
# Sweep B (same experiment, its own parent) has one trial of its own.
SWEEP_B = {
    "trial_9": ("0.25", "completed", {"r": (0.99, 0.98, 0.97), "acr": 0.90,
                                      "clean_accuracy": 0.99}),
}
ORDER_BY_THRESHOLD = ["trial_2", "trial_1", "trial_3", "trial_0"]
ORDER_STARTED = ["trial_0", "trial_1", "trial_2", "trial_3"]


def _add_sweep(client, experiment_id: str, name: str, trials: dict, start: int) -> str:
    from mlflow.entities import Metric, Param

    parent = client.create_run(experiment_id, run_name=name, start_time=start,
                               tags={tracking.ROLE_TAG: tracking.ROLE_SWEEP,
                                     tracking.SWEEP_TAG: name, tracking.SEARCHED_TAG: BY})
    parent_id = parent.info.run_id
    for offset, (trial, (threshold, outcome, final)) in enumerate(trials.items(), start=1):
        run = client.create_run(experiment_id, run_name=trial, start_time=start + offset,
                                tags={tracking.PARENT_RUN_TAG: parent_id,
                                      tracking.ROLE_TAG: tracking.ROLE_TRIAL,
                                      tracking.TRIAL_ID_TAG: f"id_{trial}",
                                      tracking.SEARCHED_TAG: BY})
        run_id = run.info.run_id
        params = [Param(BY, threshold), Param("lr", "0.001"), Param("certify.n", "100")]
        metrics = [Metric("loss", 1.0 / epoch, 0, epoch) for epoch in (1, 2)]
        metrics.append(Metric(tracking.HALLUCINATION_RATE, 0.125, 0, 2))
        if final is not None:
            metrics += [Metric(tracking.certified_accuracy_metric(radius), value, 0, 2)
                        for radius, value in zip(RADII, final["r"])]
            metrics += [Metric(key, final[key], 0, 2) for key in ("acr", "clean_accuracy")]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_tag(run_id, tracking.OUTCOME_TAG, outcome)
        client.set_terminated(run_id, "FINISHED" if final is not None else "KILLED")
    client.set_terminated(parent_id, "FINISHED")
    return parent_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with experiment ``ablation``: sweep A (4 trials) and sweep B (1), and
    an experiment ``empty`` without runs. Yields (uri, {sweep name: parent run id})."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    client.create_experiment("empty")
    parents = {"a": _add_sweep(client, experiment_id, "sweep-a", SWEEP_A, 1_000),
               "b": _add_sweep(client, experiment_id, "sweep-b", SWEEP_B, 2_000)}
    return uri, parents


@pytest.fixture(scope="module")
def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store[0])


def compare_args(uri: str, experiment: str | None = None, sweep: str | None = None,
                 by: str | None = None, fmt: str = "markdown", plot: str | None = None
                 ) -> argparse.Namespace:
    return argparse.Namespace(experiment=experiment, sweep=sweep, tracking_uri=uri, by=by,
                              format=fmt, plot=plot)


def markdown_rows(table: str) -> list[list[str]]:
    lines = table.strip().split("\n")
    assert set(lines[1]) <= set("|-:")
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in [lines[0], *lines[2:]]]


# --------------------------------------------------------------------------- tables


def test_markdown_table_by_param_has_known_values_in_order(store, capsys):
    uri, parents = store
    run_compare(compare_args(uri, sweep=parents["a"], by=BY))
    header, *rows = markdown_rows(capsys.readouterr().out)
    assert header == ["trial", "outcome", BY, "r=0.0", "r=0.25", "r=0.5", "acr",
                      "clean_accuracy", "hallucination_rate"]
    assert [row[0] for row in rows] == ORDER_BY_THRESHOLD
    by_name = {row[0]: row for row in rows}
    assert by_name["trial_2"][1:] == ["completed", "0.0", "0.600", "0.500", "0.250", "0.350",
                                      "0.600", "0.125"]
    assert by_name["trial_0"][2:6] == ["argmax", "0.700", "0.550", "0.300"]
    # Stopped early: no final metrics, shown as "-".
    assert by_name["trial_3"][1:] == ["stopped_early", "0.5", "-", "-", "-", "-", "-",
                                      "0.125"]


def test_table_without_by_keeps_the_order_trials_started(client, store):
    rows = load_trials(client, sweep_run_id=store[1]["a"])
    _header, *table = markdown_rows(format_trial_table(rows))
    assert [row[0] for row in table] == ORDER_STARTED


@pytest.mark.parametrize("source", ["experiment", "sweep"])
def test_csv_parses_to_the_known_values(store, capsys, source):
    uri, parents = store
    args = compare_args(uri, by=BY, fmt="csv", **({"experiment": EXPERIMENT}
                                                   if source == "experiment"
                                                   else {"sweep": parents["a"]}))
    run_compare(args)
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    expected = {**SWEEP_A, **(SWEEP_B if source == "experiment" else {})}
    assert sorted(row["trial"] for row in rows) == sorted(expected)
    for row in rows:
        threshold, outcome, final = expected[row["trial"]]
        assert (row[BY], row["outcome"]) == (threshold, outcome)
        assert float(row["hallucination_rate"]) == pytest.approx(0.125)
        if final is None:
            assert [row[f"r={radius}"] for radius in RADII] == ["", "", ""]
            assert row["acr"] == row["clean_accuracy"] == ""
            continue
        assert [float(row[f"r={radius}"]) for radius in RADII] == pytest.approx(final["r"])
        assert float(row["acr"]) == pytest.approx(final["acr"])
        assert float(row["clean_accuracy"]) == pytest.approx(final["clean_accuracy"])
    if source == "experiment":
        # 0.25 sorts between 0.0 and 0.5 across both sweeps.
        assert [row["trial"] for row in rows] == ["trial_2", "trial_9", "trial_1", "trial_3",
                                                  "trial_0"]


@pytest.mark.parametrize("sweep, expected", [("a", sorted(SWEEP_A)), ("b", ["trial_9"])])
def test_sweep_selects_only_its_own_trials(client, store, sweep, expected):
    rows = load_trials(client, sweep_run_id=store[1][sweep])
    assert sorted(row.name for row in rows) == expected


def test_experiment_has_the_trials_of_every_sweep(client):
    rows = load_trials(client, experiment=EXPERIMENT)
    assert sorted(row.name for row in rows) == sorted({**SWEEP_A, **SWEEP_B})
    assert all(row.searched == (BY,) for row in rows)


def test_by_may_name_a_param_that_was_not_searched(client, store):
    rows = load_trials(client, sweep_run_id=store[1]["a"])
    header, *table = markdown_rows(format_trial_table(rows, by="lr"))
    assert header[:4] == ["trial", "outcome", "lr", BY]
    assert [row[0] for row in table] == ORDER_STARTED


def test_value_key_orders_numbers_then_names():
    values = ["argmax", "10", "finetune=lora,lora_rank=4", "0.5", "2", "finetune=full", "1e-3"]
    assert sorted(values, key=value_key) == ["1e-3", "0.5", "2", "10", "argmax",
                                             "finetune=full", "finetune=lora,lora_rank=4"]


def _row(name: str, start: int, accuracy: tuple[float, ...] | None = None, **params: str
         ) -> TrialRow:
    metrics = {} if accuracy is None else {
        tracking.certified_accuracy_metric(radius): value for radius, value in zip(RADII,
                                                                                   accuracy)}
    return TrialRow(name=name, outcome="completed" if accuracy else "running", params=params,
                    metrics=metrics, searched=tuple(params), start_time=start)


def test_variant_values_are_categories_and_repeats_are_averaged():
    rows = [_row("lora8", 1, (0.5, 0.3, 0.1), variant="finetune=lora,lora_rank=8"),
            _row("full", 2, (0.9, 0.7, 0.4), variant="finetune=full"),
            _row("lora4_a", 3, (0.6, 0.4, 0.2), variant="finetune=lora,lora_rank=4"),
            _row("lora4_b", 4, (0.8, 0.6, 0.2), variant="finetune=lora,lora_rank=4"),
            _row("pending", 5, None, variant="finetune=full")]
    # Text values come in the order the sweep first ran them (a grid's order), not by name.
    _header, *table = markdown_rows(format_trial_table(rows, by="variant"))
    assert [row[0] for row in table] == ["lora8", "full", "pending", "lora4_a", "lora4_b"]
    values, series = ablation_series(rows, "variant")
    assert values == ["finetune=lora,lora_rank=8", "finetune=full",
                      "finetune=lora,lora_rank=4"]
    assert list(series) == list(RADII)
    assert series[0.0] == pytest.approx([0.5, 0.9, 0.7])
    assert series[0.25] == pytest.approx([0.3, 0.7, 0.5])


def test_a_radius_only_some_trials_have_is_missing_elsewhere():
    rows = [_row("a", 1, (0.5, 0.4, 0.3), x="1"),
            TrialRow("b", "completed", {"x": "2"}, {"certified_accuracy_r1.0": 0.2}, ("x",))]
    header, *table = markdown_rows(format_trial_table(rows, by="x"))
    assert header[3:] == ["r=0.0", "r=0.25", "r=0.5", "r=1.0"]
    assert table[0][3:] == ["0.500", "0.400", "0.300", "-"]
    assert table[1][3:] == ["-", "-", "-", "0.200"]
    values, series = ablation_series(rows, "x")
    assert values == ["1", "2"] and math.isnan(series[1.0][0])


def verdict_metrics(objective: str, difference: float, low: float, high: float,
                    p_holm: float) -> dict[str, float]:
    """A trial's validation verdict against the chosen trial, as the sweep logs it."""
    values = {"difference": difference, "low": low, "high": high, "p": p_holm / 2,
              "p_holm": p_holm, "separated": 0.0, "images": 100.0}
    return {tracking.verdict_metric(tracking.VS_LEADER, objective, field, validation=True): value
            for field, value in values.items()}


@pytest.mark.parametrize("fmt", ["markdown", "csv"])
def test_each_trials_verdict_against_the_chosen_one_is_shown(fmt):
    objective = tracking.certified_accuracy_metric(0.5)
    rows = [TrialRow("chosen", "completed", {}, {tracking.validation_metric(objective): 0.77}),
            TrialRow("close", "completed", {}, {tracking.validation_metric(objective): 0.76,
                                                **verdict_metrics(objective, -0.01, -0.03,
                                                                  0.01, 0.62)}, start_time=1),
            TrialRow("stopped", "stopped_early", {}, {}, start_time=2)]
    table = format_trial_table(rows, fmt=fmt)
    if fmt == "markdown":
        header, *cells = markdown_rows(table)
        assert header == ["trial", "outcome", "val r=0.5", "val r=0.5 − chosen",
                          "val r=0.5 Holm p"]
        assert [row[3:] for row in cells] == [["-", "-"], ["-0.010 [-0.030, +0.010]", "0.620"],
                                              ["-", "-"]]
        return
    parsed = list(csv.DictReader(io.StringIO(table)))
    name = f"val_vs_leader.{objective}."
    assert [float(parsed[1][name + field]) for field in ("difference", "low", "high",
                                                         "p_holm")] == [-0.01, -0.03, 0.01, 0.62]
    assert parsed[0][name + "difference"] == ""


def test_no_verdict_columns_without_verdicts():
    rows = [_row("a", 1, (0.5, 0.4, 0.3), x="1")]
    assert "chosen" not in format_trial_table(rows, by="x")


# Radii a default sweep's tables once showed: n = 500 at alpha 0.001 and sigma 0.5 certifies
# at most r = 1.10, so r = 1.25 was a column of zeros.
FULL_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
CERTIFIED_UP_TO_1 = ["r=0.0", "r=0.25", "r=0.5", "r=0.75", "r=1.0"]


def _certified_row(name: str, n: int) -> TrialRow:
    """A trial at sigma 0.5 certified on test with ``n`` draws, its figures (validation and
    test) on :data:`FULL_GRID`."""
    metrics = {prefix + tracking.certified_accuracy_metric(radius): 0.5 - radius / 3
               for radius in FULL_GRID for prefix in ("", tracking.VALIDATION_PREFIX)}
    return TrialRow(name, "completed", {"sigma": "0.5", "certify.n": str(n),
                                        "certify.alpha": "0.001"}, metrics)


def test_no_column_beyond_what_n_can_certify():
    rows = [_certified_row("a", 500)]
    assert max_certifiable_radius(0.5, 500, 0.001) == pytest.approx(1.10, abs=0.01)
    header = markdown_rows(format_trial_table(rows, val_reach=1.10))[0]
    assert header[2:] == [f"val {label}" for label in CERTIFIED_UP_TO_1] + CERTIFIED_UP_TO_1
    # One trial certified with more draws keeps the column: its r = 1.25 is measured.
    header = markdown_rows(format_trial_table([*rows, _certified_row("b", 100_000)]))[0]
    assert "r=1.25" in header and "val r=1.25" in header
    csv_header = format_trial_table(rows, fmt="csv", val_reach=1.10).splitlines()[0]
    assert "1.25" not in csv_header and "r=1.0" in csv_header


@pytest.mark.parametrize("source", ["experiment", "sweep"])
def test_compare_drops_each_stages_radii_beyond_its_n(tmp_path, capsys, source):
    # The rank stage certified with n = 10,000 (reaches r = 1.6), the test with n = 500.
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("reach")
    parent = client.create_run(experiment_id, tags={tracking.ROLE_TAG: tracking.ROLE_SWEEP})
    client.log_batch(parent.info.run_id, params=[Param("certify.rank.n", "10000"),
                                                 Param("certify.rank.alpha", "0.001")])
    row = _certified_row("trial_0", 500)
    trial = client.create_run(experiment_id, run_name=row.name,
                              tags={tracking.ROLE_TAG: tracking.ROLE_TRIAL,
                                    tracking.PARENT_RUN_TAG: parent.info.run_id})
    client.log_batch(trial.info.run_id,
                     metrics=[Metric(key, value, 0, 0) for key, value in row.metrics.items()],
                     params=[Param(key, value) for key, value in row.params.items()])
    run_compare(compare_args(uri, **({"experiment": "reach"} if source == "experiment" else
                                     {"sweep": parent.info.run_id})))
    header = markdown_rows(capsys.readouterr().out)[0]
    assert header[2:] == ([f"val r={radius}" for radius in FULL_GRID] + CERTIFIED_UP_TO_1)


# --------------------------------------------------------------------------- plots


@pytest.mark.parametrize("by", [None, BY])
def test_plot_writes_a_png(store, tmp_path, capsys, by):
    uri, parents = store
    path = tmp_path / "nested" / "plot.png"
    run_compare(compare_args(uri, sweep=parents["a"], by=by, plot=str(path)))
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]  # no temporary left
    err = capsys.readouterr().err
    assert f"plot: {path}" in err
    assert "trial_3 (stopped_early, no certified accuracy)" in err and "trial_0" not in err


def test_curves_stop_where_n_stops_and_labels_stay_short():
    # n = 100 at sigma 0.5 certifies at most 0.75: the 0 at r = 1.0 is n's, not the model's.
    row = TrialRow(name="trial_0", outcome="completed", searched=("lambda",),
                   params={"lambda": "1.842045315890222", "sigma": "0.5", "certify.n": "100",
                           "certify.alpha": "0.001"},
                   metrics={tracking.certified_accuracy_metric(r): a
                            for r, a in ((0.0, 0.9), (0.5, 0.6), (0.75, 0.2), (1.0, 0.0))})
    assert row.reach == pytest.approx(0.7502, abs=1e-4)
    assert reachable_points(row) == [(0.0, 0.9), (0.5, 0.6), (0.75, 0.2)]
    assert row.label == "trial_0 (lambda=1.842)"
    unknown = TrialRow(name="t", outcome="completed", params={}, metrics=row.metrics)
    assert reachable_points(unknown) == list(row.accuracy.items())


@pytest.mark.parametrize("plot", [plot_curves, lambda rows, path: plot_ablation(rows, BY, path)],
                         ids=["curves", "ablation"])
def test_plot_without_certified_trials_is_an_error(tmp_path, plot):
    with pytest.raises(CadisError, match="no certified trial"):
        plot([_row("pending", 1, None, **{BY: "0.5"})], tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, pattern", [
    ({"experiment": EXPERIMENT, "by": "sigma"}, f"sigma.*{BY}"),
    ({"experiment": "nope"}, f"'nope'.*{EXPERIMENT}"),
    ({"experiment": "empty"}, "no trial runs"),
    ({"sweep": "0" * 32}, "no MLflow run with id"),
], ids=["unknown-by", "unknown-experiment", "no-trials", "unknown-sweep"])
def test_bad_input_is_a_cadis_error(store, args, pattern):
    with pytest.raises(CadisError, match=pattern):
        run_compare(compare_args(store[0], **args))


def test_a_trial_run_id_is_not_a_sweep(client, store):
    trial = load_trials(client, sweep_run_id=store[1]["b"])[0]
    with pytest.raises(CadisError, match=f"is a trial.*{store[1]['b']}"):
        load_trials(client, sweep_run_id=trial.run_id)


def test_missing_store_is_an_error_and_is_not_created(tmp_path):
    store = tmp_path / "runs" / "mlflow.db"
    with pytest.raises(CadisError, match=f"no MLflow store at {store}"):
        run_compare(compare_args(f"sqlite:///{store}", experiment=EXPERIMENT))
    assert not store.parent.exists()


def test_default_store_comes_from_the_environment(store, monkeypatch, capsys):
    monkeypatch.setenv(TRACKING_URI_ENV, store[0])
    run_compare(compare_args(None, experiment=EXPERIMENT))
    assert "trial_9" in capsys.readouterr().out


# --------------------------------------------------------------------------- command line


def test_cli_prints_the_table(store, capsys):
    assert main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", store[0]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| trial | outcome | confidence_threshold | r=0.0 |")
    assert all(name in out for name in {**SWEEP_A, **SWEEP_B})


@pytest.mark.parametrize("extra", [["--experiment", "nope"],
                                   ["--experiment", EXPERIMENT, "--by", "sigma"]],
                         ids=["unknown-experiment", "unknown-by"])
def test_cli_bad_input_exits_2_with_one_line(store, capsys, extra):
    assert main(["compare", "--tracking-uri", store[0], *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cadis: error: ") and captured.err.count("\n") == 1


def test_cli_missing_store_exits_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["compare", "--experiment", EXPERIMENT, "--tracking-uri", uri]) == 2
    assert "no MLflow store at" in capsys.readouterr().err


@pytest.mark.parametrize("fmt,shown", [("markdown", "0.3242"), ("csv", "0.3242492436303472")])
def test_sampled_floats_read_short_in_markdown_only(fmt, shown):
    rows = [_row("a", 1, (0.5, 0.4, 0.3), epsilon="0.3242492436303472", tau="0.5")]
    text = format_trial_table(rows, fmt=fmt)
    assert shown in text and ("0.3242492436303472" in text) == (fmt == "csv")
    assert "0.5" in text
