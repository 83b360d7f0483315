"""KL-coefficient controllers for the KL-penalised PPO reward.

- `FixedKLController`: β stays at its initial value.
- `AdaptiveKLController`: proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language
  Models from Human Preferences", §2.2): e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + e·n/horizon),
  where n is the number of samples (episodes) seen since the last update.

Both expose `.value`, `update(current_kl, n_steps)` and `state_dict()` / `load_state_dict()` so that
the coefficient survives a checkpoint resume.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FixedKLController", "AdaptiveKLController", "build_kl_controller"]


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller that steers the measured KL towards `target`.

    Args:
        init_kl_coef: starting β.
        target: desired KL(π ‖ π_ref) per sequence (nats).
        horizon: number of samples over which a full proportional correction is applied.
        clip: bound on the proportional error (0.2 in Ziegler et al.).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int, clip: float = 0.2) -> None:
        super().__init__(init_kl_coef)
        if target <= 0:
            raise ValueError(f"kl target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"kl horizon must be > 0, got {horizon}")
        self.target = float(target)
        self.horizon = int(horizon)
        self.clip = float(clip)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Multiply β by 1 + clip(KL/target − 1)·n_steps/horizon; returns the new β."""
        error = min(max(current_kl / self.target - 1.0, -self.clip), self.clip)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (β plus the settings, for a sanity check on load)."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}


def build_kl_controller(
    kl_coef: float, target: float | None = None, horizon: int = 10000
) -> FixedKLController:
    """Adaptive controller when `target` is given, fixed otherwise."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
