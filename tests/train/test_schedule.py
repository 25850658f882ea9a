"""The global LR schedule against a closed-form reference: linear warmup, cosine to min_ratio·peak, then flat."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from photon.train.schedule import get_lr

PEAK, RATIO = 3e-3, 0.1


def reference(step, peak, warmup, total, ratio):
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= total:
        return peak * ratio
    t = (step - warmup) / (total - warmup)
    return peak * ratio + (peak - peak * ratio) * 0.5 * (1 + math.cos(math.pi * t))


def test_warmup_is_linear_from_peak_over_warmup_to_peak():
    lrs = [get_lr(s, PEAK, 10, 100, RATIO) for s in range(10)]
    assert lrs[0] == pytest.approx(PEAK / 10)
    assert lrs[-1] == pytest.approx(PEAK)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert steps == pytest.approx([PEAK / 10] * 9)


def test_cosine_starts_at_peak_and_ends_at_the_floor_and_stays_there():
    assert get_lr(10, PEAK, 10, 100, RATIO) == pytest.approx(PEAK)
    assert get_lr(55, PEAK, 10, 100, RATIO) == pytest.approx(PEAK * (1 + RATIO) / 2)  # halfway: the mean
    for s in (100, 101, 1000, 10**9):
        assert get_lr(s, PEAK, 10, 100, RATIO) == pytest.approx(PEAK * RATIO)
    assert get_lr(99, PEAK, 10, 100, RATIO) == pytest.approx(PEAK * RATIO, rel=1e-2)  # continuous at the end


def test_monotone_decreasing_after_warmup():
    lrs = [get_lr(s, PEAK, 20, 200, RATIO) for s in range(20, 260)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert all(lr >= PEAK * RATIO - 1e-15 for lr in lrs)


def test_warmup_zero_starts_at_peak():
    assert get_lr(0, PEAK, 0, 50, RATIO) == pytest.approx(PEAK)
    assert get_lr(50, PEAK, 0, 50, RATIO) == pytest.approx(PEAK * RATIO)


def test_warmup_as_long_as_training():
    # warmup == steps: the whole run is warmup, the schedule never divides by zero, then sits at the floor
    lrs = [get_lr(s, PEAK, 30, 30, RATIO) for s in range(30)]
    assert lrs == pytest.approx([PEAK * (s + 1) / 30 for s in range(30)])
    assert get_lr(30, PEAK, 30, 30, RATIO) == pytest.approx(PEAK * RATIO)


def test_warmup_longer_than_training_still_warms_up():
    # the config refuses warmup > steps, but the function stays defined (federated schedules are rounds × H)
    assert get_lr(49, PEAK, 50, 10, RATIO) == pytest.approx(PEAK)
    assert get_lr(50, PEAK, 50, 10, RATIO) == pytest.approx(PEAK * RATIO)


def test_min_ratio_one_is_constant_after_warmup():
    assert {round(get_lr(s, PEAK, 5, 40, 1.0), 12) for s in range(4, 80)} == {PEAK}


@given(st.integers(0, 5000), st.floats(1e-6, 1.0), st.integers(0, 500), st.integers(1, 3000),
       st.floats(0.0, 1.0))
def test_matches_the_reference(step, peak, warmup, total, ratio):
    warmup = min(warmup, total)
    lr = get_lr(step, peak, warmup, total, ratio)
    assert lr == pytest.approx(reference(step, peak, warmup, total, ratio), rel=1e-9, abs=1e-15)
    assert 0 <= lr <= peak * (1 + 1e-12)
