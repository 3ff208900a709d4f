"""Learning-rate schedules as a multiplier of each optimizer's base rate.

One factor drives every optimizer (a GAN's generator and discriminator keep their own base
rates but decay together). State is a few numbers, saved as JSON in checkpoints.

- constant: the factor stays 1.
- plateau (thesis eq. 9.1): after `patience` (3) epochs without improvement of the monitored
  metric, LR_k = LR_(k-1) * e^-alpha with alpha = 0.1.
- cosine (thesis 10.5.3): cosine decay over `period` steps, then a warm restart whose peak is
  `restart_peak` (a third) of the previous peak.
"""

from __future__ import annotations

import math
from typing import Any

from anomalyqc.errors import ConfigError


class Schedule:
    """The constant schedule, and the interface the others follow."""

    name = "constant"

    def __init__(self) -> None:
        self.factor = 1.0

    def after_step(self) -> None:
        """Called once per training step (after the optimizers stepped)."""

    def after_epoch(self, metric: float | None) -> None:
        """Called once per epoch with the monitored metric (lower is better)."""

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "factor": self.factor}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"the checkpoint's schedule is {state.get('name')!r}, not {self.name!r}")
        self.factor = float(state["factor"])


class Plateau(Schedule):
    """Reduce on plateau: factor *= e^-alpha after `patience` epochs without a relative
    improvement of more than `threshold`; never below `min_factor`."""

    name = "plateau"

    def __init__(self, patience: int = 3, alpha: float = 0.1, threshold: float = 1e-4,
                 min_factor: float = 0.0) -> None:
        super().__init__()
        if patience < 1 or alpha <= 0:
            raise ConfigError(f"plateau schedule needs patience >= 1 and alpha > 0, got "
                              f"patience={patience}, alpha={alpha}")
        self.patience, self.alpha, self.threshold = patience, alpha, threshold
        self.min_factor = min_factor
        self.best: float | None = None
        self.bad_epochs = 0

    def after_epoch(self, metric: float | None) -> None:
        if metric is None or not math.isfinite(metric):
            return
        if self.best is None or metric < self.best - self.threshold * abs(self.best):
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.factor = max(self.min_factor, self.factor * math.exp(-self.alpha))
            self.bad_epochs = 0

    def state(self) -> dict[str, Any]:
        return {**super().state(), "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


class CosineRestarts(Schedule):
    """Cosine decay from the cycle's peak to `min_factor` over `period` steps; each warm
    restart peaks at `restart_peak` times the previous peak."""

    name = "cosine"

    def __init__(self, period: int, restart_peak: float = 1 / 3, min_factor: float = 0.0) -> None:
        super().__init__()
        if period < 1 or not 0 < restart_peak <= 1:
            raise ConfigError(f"cosine schedule needs a period >= 1 step and 0 < restart_peak <= 1, "
                              f"got period={period}, restart_peak={restart_peak}")
        self.period, self.restart_peak, self.min_factor = period, restart_peak, min_factor
        self.steps = 0
        self.factor = self.factor_at(0)

    def factor_at(self, step: int) -> float:
        cycle, t = divmod(step, self.period)
        peak = self.restart_peak ** cycle
        low = min(self.min_factor, peak)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * t / self.period))

    def after_step(self) -> None:
        self.steps += 1
        self.factor = self.factor_at(self.steps)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "steps": self.steps}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.steps = int(state["steps"])
        self.factor = self.factor_at(self.steps)
