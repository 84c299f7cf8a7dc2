"""Predictors of the next planner interval's load from the ones before (sched/sla_planner.py).

Dynamo's planner offers constant, ARIMA, Kalman and Prophet; here the two a planner needs to
follow traffic without a model fit: the last value, and Holt's linear trend for ramps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Predictor(Protocol):
    def update(self, x: float) -> None: ...

    def predict(self) -> float: ...


@dataclass
class ConstantPredictor:
    """The next interval looks like the last one (Dynamo's `constant`)."""

    last: float | None = None

    def update(self, x: float) -> None:
        self.last = x

    def predict(self) -> float:
        return self.last or 0.0


@dataclass
class HoltPredictor:
    """Holt's linear (double exponential) smoothing: a level and a trend, one step ahead.

    Follows a ramp (morning traffic) with a bounded lag instead of a constant one; alpha weighs the
    newest value in the level, beta the newest slope in the trend. Never predicts below zero."""

    alpha: float = 0.5
    beta: float = 0.3
    level: float | None = None
    trend: float = 0.0

    def update(self, x: float) -> None:
        if self.level is None:
            self.level = x
            return
        prev = self.level
        self.level = self.alpha * x + (1 - self.alpha) * (prev + self.trend)
        self.trend = self.beta * (self.level - prev) + (1 - self.beta) * self.trend

    def predict(self) -> float:
        return max(0.0, (self.level or 0.0) + self.trend)


PREDICTORS = {"constant": ConstantPredictor, "holt": HoltPredictor}


def make_predictor(name: str) -> Predictor:
    if name not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}")
    return PREDICTORS[name]()  # type: ignore[no-any-return]
