"""Intervals and paired comparisons of the evaluation, against values worked out by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parsyn.eval import stats as S


def test_paired_counts_regressions_and_rescues():
    text = [True, True, True, False, False, True]
    method = [True, False, True, True, False, False]
    got = S.paired(method, text)
    assert (got["regressions"], got["rescues"]) == (2, 1)
    assert got["diff"] == pytest.approx(-1 / 6) and got["regression_rate"] == pytest.approx(2 / 6)
    low, high = got["diff_ci"]
    assert low <= got["diff"] <= high and low < 0 < high  # six items decide nothing
    assert S.paired(text, text)["diff_ci"] == [0.0, 0.0]


def test_intervals_narrow_with_more_items_and_are_seeded():
    few, many = S.accuracy([True, False] * 10), S.accuracy([True, False] * 500)
    width = lambda r: r["accuracy_ci"][1] - r["accuracy_ci"][0]
    assert few["accuracy"] == many["accuracy"] == 0.5 and width(many) < width(few) / 5
    assert 0.05 < width(many) < 0.08  # 2 * 1.96 * sqrt(0.25 / 1000) = 0.062
    assert S.accuracy([True, False] * 10) == few


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=60))
def test_the_interval_holds_the_mean(scores):
    r = S.accuracy(scores)
    assert r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1]


def test_mismatched_or_empty_scores_are_refused():
    with pytest.raises(ValueError, match="same items"):
        S.paired([True], [True, False])
    with pytest.raises(ValueError, match="at least one item"):
        S.interval([])
