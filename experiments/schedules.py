"""Learning-rate schedules for every benchmark: ``constant``, ``cosine`` and ``plateau``.

The learning rate is an argument of the jitted train step (traced), so a schedule never
recompiles and each vmapped seed can have its own rate (reduce-on-plateau reacts to its own
validation score).

* ``constant``: ``lr``.
* ``cosine``: ``lr · (f + (1 - f)(1 + cos(π s / S)) / 2)`` at step ``s`` of ``S`` (``f`` =
  ``min_factor``, default 0), after an optional linear warm-up of ``warmup`` steps.
* ``plateau``: ``lr · factor^k`` where ``k`` counts the times the validation score (Δm% of
  the run's tasks, lower is better, :mod:`experiments.selection`) has not improved by more
  than ``threshold`` for ``patience`` consecutive evaluations (PyTorch's
  ``ReduceLROnPlateau`` on the validation metric, as in the QM9 protocol of the papers).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["SCHEDULES", "Schedule", "Plateau"]

SCHEDULES = ("constant", "cosine", "plateau")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule (see the module docstring)."""

    kind: str = "constant"
    lr: float = 1e-3
    steps: int = 1
    warmup: int = 0
    min_factor: float = 0.0
    factor: float = 0.5
    patience: int = 3
    threshold: float = 1e-4
    min_lr: float = 1e-6

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule: unknown kind {self.kind!r}; choose from {', '.join(SCHEDULES)}")
        if not (0 < self.factor < 1):
            raise ValueError(f"schedule: plateau factor must be in (0, 1), got {self.factor}")

    def base(self, step: int) -> float:
        """The rate at ``step`` before any plateau reduction."""
        lr = self.lr
        if self.warmup and step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.kind == "cosine":
            s = min(max(step - self.warmup, 0), max(self.steps - self.warmup, 1))
            c = 0.5 * (1.0 + math.cos(math.pi * s / max(self.steps - self.warmup, 1)))
            return lr * (self.min_factor + (1.0 - self.min_factor) * c)
        return lr


class Plateau:
    """The reduce-on-plateau state of one run: ``scale`` multiplies :meth:`Schedule.base`."""

    def __init__(self, schedule: Schedule, state: dict | None = None):
        self.schedule = schedule
        s = state or {}
        self.best = s.get("best", math.inf)
        self.bad = int(s.get("bad", 0))
        self.scale = float(s.get("scale", 1.0))
        if self.best is None:
            self.best = math.inf

    def update(self, score: float) -> float:
        """Records one validation score (lower = better); returns the new scale."""
        if self.schedule.kind != "plateau":
            return self.scale
        if math.isfinite(score) and score < self.best - self.schedule.threshold:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
            if self.bad >= self.schedule.patience:
                floor = self.schedule.min_lr / self.schedule.lr
                self.scale = max(self.scale * self.schedule.factor, floor)
                self.bad = 0
        return self.scale

    def state(self) -> dict:
        return {"best": self.best if math.isfinite(self.best) else None, "bad": self.bad, "scale": self.scale}

    def lr(self, step: int) -> float:
        return self.schedule.base(step) * self.scale
