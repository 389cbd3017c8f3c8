"""cadis.validation: one rule per kind of value, each refusing with one line that names the key
and what is allowed."""

from __future__ import annotations

import math

import pytest

from cadis.errors import CadisError
from cadis.validation import (
    check_sigma,
    check_sigmas,
    integer_at_least,
    number_in,
    positive_float_or_none,
    positive_int,
)


@pytest.mark.parametrize("value", [2, 3, 10**6])
def test_an_integer_at_least_its_floor_is_taken(value):
    assert integer_at_least(value, "num_classes", 2) == value


@pytest.mark.parametrize("value", [1, 0, 2.0, True, "2", None])
def test_an_integer_below_its_floor_or_not_an_integer_is_refused(value):
    with pytest.raises(CadisError, match=r"^num_classes must be an integer >= 2, got "):
        integer_at_least(value, "num_classes", 2)


def test_positive_int_says_what_the_count_counts():
    with pytest.raises(CadisError, match=r"^num_trials is required: an integer >= 1 \(trials\)$"):
        positive_int(None, "num_trials", "trials")
    with pytest.raises(CadisError, match=r"^n must be an integer >= 1 \(draws\), got 0$"):
        positive_int(0, "n", "draws")


@pytest.mark.parametrize("ends,inside,outside", [
    ("(]", [1e-9, 0.5, 1.0], [0.0, 1.5, -0.1]),
    ("[)", [0.0, 0.5, 0.999], [1.0, -0.1]),
    ("[]", [0.0, 1.0], [1.0001, -1e-9]),
    ("()", [0.5], [0.0, 1.0]),
])
def test_a_number_in_an_interval_keeps_or_drops_each_end(ends, inside, outside):
    for value in inside:
        assert number_in(value, "x", 0.0, 1.0, ends) == value
    for value in outside + [math.nan, math.inf, True, "0.5", None]:
        with pytest.raises(CadisError, match=rf"^x must be a number in \{ends[0]}0, 1\{ends[1]}"):
            number_in(value, "x", 0.0, 1.0, ends)


def test_a_number_in_an_interval_says_what_an_end_means():
    with pytest.raises(CadisError, match=r"^drop_path must be a number in \[0, 1\) \(0 = off\), "
                                         r"got 1.0$"):
        number_in(1.0, "drop_path", 0.0, 1.0, "[)", "0 = off")


def test_a_positive_float_or_none_takes_null_for_off():
    assert positive_float_or_none(None, "grad_clip") is None
    assert positive_float_or_none(3, "grad_clip") == 3.0
    for value in (0.0, -1.0, math.inf, math.nan, "big", False):
        with pytest.raises(CadisError, match=r"^grad_clip must be a finite number > 0, or null"):
            positive_float_or_none(value, "grad_clip")


def test_sigmas_are_a_non_empty_list_of_noise_levels():
    assert check_sigmas([0.25, 1], "eval_sigmas") == (0.25, 1.0)
    assert check_sigma(0.5) == 0.5
    for values, words in (((), "non-empty list"), (0.5, "non-empty list"),
                          ((0.25, 0.0), "> 0 and finite"), ((math.nan,), "> 0 and finite")):
        with pytest.raises(CadisError, match=rf"^eval_sigmas must be (a )?{words}"):
            check_sigmas(values, "eval_sigmas")
