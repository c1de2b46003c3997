"""Divergence rules: each a pure function, and `DivergenceMonitor` that applies them step by step.

Rules (issue 5, from the precursor's failures, SCIENCE §4):

- `non_finite`: NaN/inf in the loss or the residual (or the weights, checked by the caller).
- `residual_hard_limit`: the free-phase residual above a hard limit (no fixed point: limit cycle).
- `residual_window`: the residual above the validity level for a long window of consecutive steps
  (the precursor's BPTT sat at 0.068, under a 0.1 fuse, for 8,400 steps).
- `stall`: the residual exactly 0, or ε·F below the float resolution of the state (the relative
  one-step residual under the dtype's machine epsilon), while the loss is high: an explosion
  disguised as convergence (SCIENCE §4: res ≡ 0 at val CE 60–77).
- `loss_explosion`: the loss above `explosion_ratio` × the lowest loss seen so far and above
  ln(vocab) (worse than guessing uniformly).

The monitor carries only the window counter and the lowest loss: both are in `state_dict`, so a
resumed run makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ept_hw.config import check_positive_int, check_range

__all__ = [
    "DivergenceConfig",
    "DivergenceEvent",
    "DivergenceMonitor",
    "check_non_finite",
    "check_residual_hard_limit",
    "check_stall",
    "check_loss_explosion",
    "float_resolution",
]


@dataclass(frozen=True)
class DivergenceConfig:
    residual_hard_limit: float = 0.1
    validity_level: float = 1e-2
    window: int = 200  # consecutive steps above validity_level that stop the run
    stall_loss_ratio: float = 2.0  # "loss is high" for the stall rule: loss > ratio * ln(vocab)
    explosion_ratio: float = 3.0

    def __post_init__(self) -> None:
        check_range("divergence.residual_hard_limit", self.residual_hard_limit, 0.0, None, lo_open=True)
        check_range("divergence.validity_level", self.validity_level, 0.0, self.residual_hard_limit, lo_open=True)
        check_positive_int("divergence.window", self.window)
        check_range("divergence.stall_loss_ratio", self.stall_loss_ratio, 0.0, None, lo_open=True)
        check_range("divergence.explosion_ratio", self.explosion_ratio, 1.0, None, lo_open=True)


@dataclass(frozen=True)
class DivergenceEvent:
    rule: str
    step: int
    path: str
    message: str
    loss: float
    residual: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def float_resolution(dtype: torch.dtype = torch.float32) -> float:
    """Relative spacing of floats of `dtype` (machine epsilon): an increment ε·F smaller than this
    fraction of the state is absorbed by the addition z + ε·F."""
    return float(torch.finfo(dtype).eps)


def check_non_finite(loss: float, residual: float) -> str | None:
    bad = [name for name, v in (("loss", loss), ("residual", residual)) if not math.isfinite(v)]
    return f"non-finite {' and '.join(bad)} (loss {loss}, residual {residual})" if bad else None


def check_residual_hard_limit(residual: float, limit: float) -> str | None:
    if residual > limit:
        return f"free-phase residual {residual:.3e} above the hard limit {limit:g}: no fixed point (limit cycle?)"
    return None


def check_stall(residual: float, loss: float, loss_high: float, dtype: torch.dtype = torch.float32) -> str | None:
    resolution = float_resolution(dtype)
    if (residual == 0.0 or residual < resolution) and loss > loss_high:
        return (
            f"stall: residual {residual:.3e} at or below the float resolution {resolution:.1e} while the loss "
            f"{loss:.3f} is above {loss_high:.3f}: an explosion disguised as convergence"
        )
    return None


def check_loss_explosion(loss: float, best_loss: float, ratio: float, uniform_loss: float) -> str | None:
    if loss > ratio * best_loss and loss > uniform_loss:
        return f"loss explosion: {loss:.3f} > {ratio:g} x the best loss {best_loss:.3f} and above ln(vocab) = {uniform_loss:.3f}"
    return None


class DivergenceMonitor:
    """Applies every rule to one path's per-step figures; returns the first event or None."""

    def __init__(self, cfg: DivergenceConfig, vocab_size: int, path: str, dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.path = path
        self.dtype = dtype
        self.uniform_loss = math.log(vocab_size)
        self.steps_above = 0
        self.best_loss = math.inf

    def check(self, step: int, loss: float, residual: float) -> DivergenceEvent | None:
        cfg = self.cfg

        def event(rule: str, msg: str) -> DivergenceEvent:
            return DivergenceEvent(rule, step, self.path, f"{self.path}: step {step}: {msg}", loss, residual)

        msg = check_non_finite(loss, residual)
        if msg:
            return event("non_finite", msg)
        msg = check_residual_hard_limit(residual, cfg.residual_hard_limit)
        if msg:
            return event("residual_hard_limit", msg)
        self.steps_above = self.steps_above + 1 if residual > cfg.validity_level else 0
        if self.steps_above >= cfg.window:
            return event(
                "residual_window",
                f"residual above the validity level {cfg.validity_level:g} for {self.steps_above} consecutive steps "
                f"(now {residual:.3e})",
            )
        msg = check_stall(residual, loss, cfg.stall_loss_ratio * self.uniform_loss, self.dtype)
        if msg:
            return event("stall", msg)
        msg = check_loss_explosion(loss, self.best_loss, cfg.explosion_ratio, self.uniform_loss)
        if msg:
            return event("loss_explosion", msg)
        self.best_loss = min(self.best_loss, loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"steps_above": self.steps_above, "best_loss": self.best_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_above = int(state["steps_above"])
        self.best_loss = float(state["best_loss"])
