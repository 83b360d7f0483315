"""Fixed and adaptive KL controllers, and their state round trip."""

from __future__ import annotations

import pytest

from rlhf_lightning.ppo.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05
    assert isinstance(build_kl_controller(0.1), FixedKLController)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)


def test_adaptive_controller_hand_worked():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=100)
    # KL 9 → error clip(0.5) = 0.2 → β · (1 + 0.2·10/100) = 0.2·1.02
    assert ctl.update(9.0, 10) == pytest.approx(0.204)
    # KL 4.5 → error −0.25 clipped to −0.2 → · 0.98
    assert ctl.update(4.5, 10) == pytest.approx(0.204 * 0.98)
    # KL 6.6 → error 0.1 → · (1 + 0.1·50/100)
    assert ctl.update(6.6, 50) == pytest.approx(0.204 * 0.98 * 1.05)
    # on target → unchanged
    before = ctl.value
    assert ctl.update(6.0, 50) == pytest.approx(before)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(3.0, 5)
    other = build_kl_controller(0.1, target=1.0, horizon=10)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    assert other.update(0.0, 5) == ctl.update(0.0, 5)
