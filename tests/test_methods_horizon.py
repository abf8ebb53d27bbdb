"""TOPD / POPD horizons on hand-made schedules."""

from __future__ import annotations

import pytest

from opd_student.methods.horizon import progressive_horizon, rollout_horizon, truncated_horizon


@pytest.mark.parametrize(
    ("max_new_tokens", "ratio", "expected"),
    [(48, 1.0, 48), (48, 0.25, 12), (48, 0.1, 4), (10, 0.3, 3), (100, 0.29, 29), (48, 0.01, 1)],
)
def test_topd_keeps_the_first_rho_t_tokens(max_new_tokens, ratio, expected):
    assert truncated_horizon(max_new_tokens, ratio) == expected


def test_popd_follows_the_schedule():
    # H_k = min(T, H0 + ΔH·⌊k/Δk⌋) with T = 20, H0 = 8, ΔH = 4, Δk = 3, written out by hand.
    expected = [8, 8, 8, 12, 12, 12, 16, 16, 16, 20, 20, 20, 20, 20]
    assert [progressive_horizon(k, 20, 8, 4, 3) for k in range(14)] == expected
    assert [rollout_horizon(k, 20, start=8, growth=4, every=3) for k in range(14)] == expected
    assert [progressive_horizon(k, 48, 16, 0, 1) for k in range(5)] == [16] * 5  # ΔH = 0: a fixed horizon


def test_topd_caps_popd_and_defaults_are_the_full_horizon():
    assert [rollout_horizon(k, 20, ratio=0.5, start=8, growth=4, every=3) for k in range(7)] == [8] * 3 + [
        10
    ] * 4
    assert [rollout_horizon(k, 48) for k in (0, 5, 500)] == [48, 48, 48]


@pytest.mark.parametrize(
    "call",
    [
        lambda: truncated_horizon(48, 0.0),
        lambda: truncated_horizon(48, 1.5),
        lambda: progressive_horizon(0, 48, 0, 4, 2),
        lambda: progressive_horizon(0, 48, 8, 4, 0),
        lambda: progressive_horizon(0, 48, 8, -1, 2),
    ],
)
def test_bad_settings_are_refused(call):
    with pytest.raises(ValueError):
        call()
