"""Margins learnt from reported usage: never below the floor nor above the cap, the fixed
margin until enough samples, convergence to what covers the provider's counts, explicit
overrides untouched."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.context.calibration import (
    MARGIN_STEP,
    Calibration,
    CalibrationSettings,
    RatioWindow,
    margin_for,
)
from extproc.context.models import FAMILY_MARGINS, ModelTable

S = CalibrationSettings(min_samples=20, window=200, quantile=0.98, min_prompt_tokens=256)

ratios = st.floats(min_value=0.34, max_value=2.9, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(high=st.floats(min_value=0, max_value=10, allow_nan=False))
def test_margin_for_stays_within_floor_and_cap(high: float) -> None:
    margin = margin_for(high, S)
    assert S.floor <= margin <= S.cap
    if S.floor < high - 1 + S.safety < S.cap:
        # Covers the ratio with the safety added, at most one step more.
        assert high - 1 + S.safety <= margin + 1e-9 < high - 1 + S.safety + MARGIN_STEP


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(ratios, min_size=0, max_size=300), floor=st.sampled_from([0, 0.02, 0.1]))
def test_never_below_the_floor_and_nothing_before_min_samples(
    samples: list[float], floor: float
) -> None:
    s = CalibrationSettings(min_samples=20, window=50, floor=floor)
    cal = Calibration(s)
    for i, ratio in enumerate(samples, 1):
        assert cal.observe("m", "o200k", 1000, round(1000 * ratio))
        margin = cal.margin("m", "o200k")
        if i < s.min_samples:
            assert margin is None  # the fixed margin still applies
        else:
            assert margin is not None and floor <= margin <= s.cap


@settings(max_examples=30, deadline=None)
@given(
    ratio=st.floats(min_value=1.0, max_value=1.4),
    spread=st.floats(min_value=0.0, max_value=0.03),
    seed=st.integers(0, 2**32 - 1),
)
def test_converges_to_a_margin_that_covers_the_provider(
    ratio: float, spread: float, seed: int
) -> None:
    """Stationary ratios around `ratio`: after the window fills, the margin covers at least the
    window's 98th percentile (so nearly every request fits) and is not far above the largest."""
    rng = random.Random(seed)
    cal = Calibration(S)
    seen: list[float] = []
    for _ in range(400):
        r = ratio + rng.uniform(-spread, spread)
        estimated = 2000
        reported = round(estimated * r)
        cal.observe("m", "claude", estimated, reported)
        seen.append(reported / estimated)
    margin = cal.margin("m", "claude")
    assert margin is not None
    recent = sorted(seen[-S.window :])
    covered = sum(1 for r in recent if r <= 1 + margin) / len(recent)
    assert covered >= 0.98
    assert margin <= max(S.floor, recent[-1] - 1 + S.safety) + MARGIN_STEP + 1e-9


def test_the_margin_follows_a_change_of_provider_behaviour() -> None:
    cal = Calibration(S)
    for _ in range(200):
        cal.observe("m", "other", 1000, 1300)
    assert cal.margin("m", "other") == pytest.approx(0.32)
    for _ in range(200):  # a full window later, only the new ratios count
        cal.observe("m", "other", 1000, 1000)
    assert cal.margin("m", "other") == pytest.approx(0.02)


def test_ignored_observations_are_counted_by_reason() -> None:
    events: list[str] = []
    cal = Calibration(S, on_event=events.append)
    assert not cal.observe("m", "o200k", 100, 130)  # too small to say much
    assert not cal.observe("m", "o200k", 1000, 1300, media=True)
    assert not cal.observe("m", "o200k", 1000, 5000)  # not a tokenizer difference
    assert not cal.observe("m", "o200k", 1000, 0)
    assert cal.observe("m", "o200k", 1000, 1010)
    assert events == [
        "ignored.small_prompt",
        "ignored.media",
        "ignored.outlier",
        "ignored.outlier",
        "samples.o200k",
    ]
    assert cal.snapshot()["family:o200k"] == {"samples": 1, "margin": None}


def test_a_model_uses_its_own_window_once_it_has_enough_samples() -> None:
    cal = Calibration(S)
    for _ in range(S.min_samples):
        cal.observe("a", "other", 1000, 1300)
    for _ in range(S.min_samples - 1):
        cal.observe("b", "other", 1000, 1000)
    assert cal.margin("a", "other") == pytest.approx(0.32)
    # b has too few of its own: the family's (which mixes a's and b's ratios).
    assert cal.margin("b", "other") == cal.margin("never-seen", "other")
    cal.observe("b", "other", 1000, 1000)
    assert cal.margin("b", "other") == pytest.approx(0.02)


def test_ratio_window_quantile() -> None:
    window = RatioWindow(5)
    for r in (1.0, 1.5, 1.1, 1.2, 1.3, 1.05):  # 1.0 leaves the window
        window.add(r)
    assert len(window) == 5
    assert window.quantile(1.0) == 1.5
    assert window.quantile(0.5) == 1.2
    assert window.quantile(0.0) == 1.05


def test_model_table_applies_learnt_margins_but_not_over_explicit_ones() -> None:
    table = ModelTable(
        {"pinned": {"window": 4096, "margin": 0.07}, "free": {"window": 4096}},
        32768,
        Calibration(S),
    )
    assert table.lookup("gpt-4o").safety_margin == FAMILY_MARGINS["o200k"]
    for _ in range(S.min_samples):
        table.observe_usage("gpt-4o-2024-08-06", 1000, 1200, False)
        table.observe_usage("pinned", 1000, 1300, False)
        table.observe_usage("free", 1000, 1300, False)
    dated = table.lookup("gpt-4o-2024-08-06")
    assert dated.safety_margin == pytest.approx(0.22)  # its own samples
    assert dated.window == 128_000
    assert table.lookup("gpt-4o-2024-08-06") is dated  # no new object per request
    assert table.lookup("gpt-4.1").safety_margin == pytest.approx(0.22)  # the family's
    assert table.lookup("gpt-4").safety_margin == FAMILY_MARGINS["cl100k"]  # nothing learnt
    assert table.lookup("pinned").safety_margin == 0.07  # the config's word wins
    assert table.lookup("free").safety_margin == pytest.approx(0.32)


def test_without_calibration_the_table_is_unchanged() -> None:
    table = ModelTable({}, 32768)
    table.observe_usage("gpt-4o", 1000, 1300, False)  # nothing to feed: ignored
    assert table.lookup("gpt-4o").safety_margin == FAMILY_MARGINS["o200k"]
