"""Stabilisation controllers and schedules (SCIENCE §4–5).

- `JacregController`: λ ← clip(λ·(res_ema/res_target)^exponent, floor, max). The floor is a
  validated positive number and never anneals: runs whose λ reached 0 "converged" to res ≡ 0 at a
  validation CE of 60–77 (an explosion hidden by float absorption, SCIENCE §4). With the
  controller off (the default recipe) λ stays frozen at its initial value.
- `ValidityGate`: skip the EP nudge when the (noise-aware) residual is above a level; the caller
  still applies the stabilisers (a gate must never bypass resreg).
- `LRSchedule`: constant or warmup-stable-decay (linear warmup, flat, linear decay over the last
  `decay_fraction` of the run to `final_ratio`·lr), a pure function of the step.
- `ParameterEMA`: an exponential moving average of parameter tensors (the best-digital reference).

Every object has `state_dict`/`load_state_dict` so that a checkpoint resumes it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from ept_hw.config import ConfigError, check_choice, check_positive_int, check_range

__all__ = [
    "ControllerConfig",
    "JacregController",
    "ValidityGate",
    "ScheduleConfig",
    "LRSchedule",
    "ParameterEMA",
]


@dataclass(frozen=True)
class ControllerConfig:
    """The jacreg λ controller. Defaults: the reference constants of SCIENCE §5, controller off
    (λ frozen at `initial`, as in the precursor's best run)."""

    enabled: bool = False
    initial: float = 0.1
    floor: float = 0.1
    max: float = 16.0
    res_target: float = 1.5e-3
    res_ema: float = 0.9
    exponent: float = 0.3

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("controller.enabled", self.enabled, "true or false")
        # The floor must stay strictly positive: lambda -> 0 is the failure mode this guards.
        check_range("controller.floor", self.floor, 0.0, None, lo_open=True)
        check_range("controller.max", self.max, self.floor, None)
        check_range("controller.initial", self.initial, self.floor, self.max)
        check_range("controller.res_target", self.res_target, 0.0, None, lo_open=True)
        check_range("controller.res_ema", self.res_ema, 0.0, 1.0, hi_open=True)
        check_range("controller.exponent", self.exponent, 0.0, None, lo_open=True)


class JacregController:
    """λ ← clip(λ·(res_ema/res_target)^exponent, floor, max), on the noise-aware residual."""

    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg
        self.lam = float(cfg.initial)
        self.res_ema: float | None = None

    def update(self, residual: float) -> float:
        """Feed one step's residual; return the λ to use from now on."""
        if not math.isfinite(residual):
            return self.lam
        a = self.cfg.res_ema
        self.res_ema = residual if self.res_ema is None else a * self.res_ema + (1.0 - a) * residual
        if self.cfg.enabled:
            ratio = max(self.res_ema, 1e-30) / self.cfg.res_target
            self.lam = min(max(self.lam * ratio**self.cfg.exponent, self.cfg.floor), self.cfg.max)
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "res_ema": self.res_ema}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lam = float(state["lam"])
        self.res_ema = None if state["res_ema"] is None else float(state["res_ema"])


class ValidityGate:
    """Open (learn) unless enabled and the residual is above `level` or not finite."""

    def __init__(self, enabled: bool = False, level: float = 1e-2):
        check_range("gate.level", level, 0.0, None, lo_open=True)
        self.enabled = bool(enabled)
        self.level = float(level)

    def is_open(self, residual: float) -> bool:
        if not self.enabled:
            return True
        return math.isfinite(residual) and residual <= self.level


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "constant"  # "constant" | "wsd"
    warmup_steps: int = 0
    decay_fraction: float = 0.25
    final_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choice("schedule.kind", self.kind, ("constant", "wsd"))
        check_positive_int("schedule.warmup_steps", self.warmup_steps, minimum=0)
        check_range("schedule.decay_fraction", self.decay_fraction, 0.0, 1.0)
        check_range("schedule.final_ratio", self.final_ratio, 0.0, 1.0)


class LRSchedule:
    """Learning-rate multiplier as a pure function of the (0-based) step; no state to checkpoint."""

    def __init__(self, cfg: ScheduleConfig, total_steps: int):
        check_positive_int("training.steps", total_steps)
        self.cfg = cfg
        self.total_steps = total_steps

    def factor(self, step: int) -> float:
        cfg = self.cfg
        warm = 1.0
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            warm = (step + 1) / cfg.warmup_steps
        if cfg.kind == "constant":
            return warm
        decay_steps = int(round(cfg.decay_fraction * self.total_steps))
        decay_start = self.total_steps - decay_steps
        if decay_steps <= 0 or step < decay_start:
            return warm
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return min(warm, 1.0 - (1.0 - cfg.final_ratio) * progress)

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.factor(step)


class ParameterEMA:
    """shadow ← decay·shadow + (1 − decay)·param, for a dict of tensors (decay 0 = off)."""

    def __init__(self, decay: float, params: Mapping[str, Tensor]):
        check_range("training.ema", decay, 0.0, 1.0, hi_open=True)
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in params.items()}

    def update(self, params: Mapping[str, Tensor]) -> None:
        for k, v in params.items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: torch.as_tensor(v).clone() for k, v in state["shadow"].items()}
