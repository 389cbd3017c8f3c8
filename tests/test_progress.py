"""Progress on a terminal (tqdm's bar) and in a log (whole lines at an interval, a final one)."""

from __future__ import annotations

import io
import re

import pytest
from tqdm import tqdm

from cadis.cli import main
from cadis.errors import CadisError
from cadis.progress import (
    DEFAULT_LOG_INTERVAL_S,
    LOG_INTERVAL_ENV,
    LogProgress,
    log_interval_s,
    progress_bar,
)


class Clock:
    """Time that moves only when told: the lines a run of known pace writes."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_interval_and_a_final_line():
    stream, clock = io.StringIO(), Clock()
    with progress_bar(10, "epoch 1/2", "step", stream=stream, interval_s=30, clock=clock) as bar:
        for step in range(10):
            clock.now += 10  # one step every 10 s: a line at steps 3, 6 and 9
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
            bar.update()
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines == [
        "epoch 1/2: 3/10 step (30%), 0.1 step/s, 00:30 spent, 01:10 left, loss=0.333",
        "epoch 1/2: 6/10 step (60%), 0.1 step/s, 01:00 spent, 00:40 left, loss=0.167",
        "epoch 1/2: 9/10 step (90%), 0.1 step/s, 01:30 spent, 00:10 left, loss=0.111",
        "epoch 1/2: done, 10/10 step in 01:40, 0.1 step/s, loss=0.100",
    ]


def test_a_resumed_run_counts_its_rate_from_where_it_started():
    stream, clock = io.StringIO(), Clock()
    bar = progress_bar(100, "certify", "img", initial=90, stream=stream, interval_s=0,
                       clock=clock)
    clock.now += 5
    bar.update(5)
    clock.now += 5
    bar.update(3)
    bar.close()
    bar.close()  # once only
    assert stream.getvalue().splitlines() == [
        "certify: 95/100 img (95%), 1 img/s, 00:05 spent, 00:05 left",
        "certify: 98/100 img (98%), 0.8 img/s, 00:10 spent, 00:02 left",
        "certify: stopped at 98/100 img in 00:10, 0.8 img/s",
    ]


def test_fast_rates_read_as_whole_numbers():
    stream, clock = io.StringIO(), Clock()
    with progress_bar(5000, "denoise draws", "img", stream=stream, clock=clock) as bar:
        clock.now += 2
        bar.update(5000)
    assert stream.getvalue() == "denoise draws: done, 5000/5000 img in 00:02, 2500 img/s\n"


def test_a_loop_that_fails_still_says_where_it_stopped():
    stream, clock = io.StringIO(), Clock()
    with pytest.raises(KeyError):
        with progress_bar(4, "denoise draws", "img", stream=stream, clock=clock) as bar:
            clock.now += 2
            bar.update(2)
            raise KeyError("boom")
    assert stream.getvalue() == "denoise draws: stopped at 2/4 img in 00:02, 1 img/s\n"


def test_a_terminal_gets_the_live_bar_and_disabled_writes_nothing():
    terminal = Terminal()
    bar = progress_bar(3, "certify", "img", stream=terminal)
    assert isinstance(bar, tqdm) and not isinstance(bar, LogProgress)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    for stream in (io.StringIO(), Terminal()):
        with progress_bar(3, "certify", "img", enabled=False, stream=stream) as quiet:
            quiet.update(3)
        assert stream.getvalue() == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(LOG_INTERVAL_ENV, raising=False)
    assert log_interval_s() == DEFAULT_LOG_INTERVAL_S
    monkeypatch.setenv(LOG_INTERVAL_ENV, "0.5")
    assert log_interval_s() == 0.5
    assert progress_bar(1, "x", "img", stream=io.StringIO()).interval_s == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(LOG_INTERVAL_ENV, bad)
        with pytest.raises(CadisError, match=f"{LOG_INTERVAL_ENV} must be a number of seconds"):
            log_interval_s()


def test_cadis_train_in_a_log_writes_lines_not_redraws(tiny_models_dir, tmp_path, capsys,
                                                       monkeypatch):
    # capsys's stderr is not a terminal, as a Ray job's log is not: every step a line.
    monkeypatch.setenv(LOG_INTERVAL_ENV, "0")
    args = ["train", "sweeps/default.yaml", "--out", str(tmp_path / "out")]
    for item in (f"models={tiny_models_dir}", "epochs=1", "max_steps_per_epoch=2",
                 "batch_size=4", "effective_batch_size=8", "val_images=20", "proxy_images=4",
                 "proxy_n=10", "proxy_n0=4", "certify.n=20", "certify.n0=5",
                 "certify.max_images=3", "certify.skip=1", "warmup_steps=1", "train_draws=0"):
        args += ["--set", item]
    assert main(args) == 0
    err = capsys.readouterr().err
    steps = [line for line in err.split("\n") if "epoch 1/1" in line]
    assert steps and "\r" not in err
    assert re.fullmatch(r"epoch 1/1: 1/2 step \(50%\), [0-9.e+-]+ step/s, .* spent, .* left, "
                        r"loss=[0-9.]+, masked=[0-9.]+", steps[0])
    assert steps[1].startswith("epoch 1/1: 2/2 step (100%)")
    assert steps[2].startswith("epoch 1/1: done, 2/2 step in ")
