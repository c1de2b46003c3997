"""The free phase as the circuit runs it: explicit Euler with a noise-aware stopping rule.

On the analog path every force evaluation reads every projection once, with noise, so the
one-step residual ‖εF(z)‖/‖z‖ (SCIENCE §2) cannot fall below a floor set by the read noise. This
module integrates z ← z + εF(z) from x_in (the same integrator and step as the twin) and stops on

    res_W = ‖z_t − z_{t−W}‖ / (W ‖z̄‖)      per sample, z̄ the mean of the last W states,

the residual of the time-averaged dynamics (z_t − z_{t−W} = ε Σ F over the window, so res_W is the
one-step residual of the window-mean force; read noise averages down by √W while a true drift does
not). The run stops when max_b res_W ≤ tol after `min_steps` (converged), when res_W has not
improved for `patience` steps (at the noise floor: `at_floor`), or at `max_steps`. The state
returned is z̄, the time average of the last W states (a low-pass filtered read-out of the
circuit, the best estimate of the fixed point under noise).

The floor itself is measured at the end: two independent reads of F at z̄ give
floor = ε‖F₁ − F₂‖/(√2‖z̄‖), the one-step residual that read noise alone produces. On the
noise-free twin the two reads are identical and the floor is exactly 0.

The same function runs on both paths, so with ideal devices and perfect periphery the two
free phases are the same computation.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ept_hw.relaxation import NonFiniteStateError, RelaxResult, SolverConfig, one_step_residual

__all__ = ["FreePhase", "noise_aware_free_phase"]

Force = Callable[[Tensor], Tensor]


@dataclass
class FreePhase:
    """A `RelaxResult` (for the estimator) plus the noise figures."""

    result: RelaxResult
    residual: float  # noise-aware residual max_b res_W (what the gate/controller/monitor use)
    residual_raw: float  # last one-step residual, max over samples (includes read noise)
    floor: float  # one-step residual produced by read noise alone, max over samples
    at_floor: bool
    steps: int


def _per_sample_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _window_mean(history: deque) -> Tensor:
    # The last W states (history holds W + 1: the oldest is only the drift's reference).
    states = list(history)[1:]
    return torch.stack(states).mean(dim=0)


def noise_aware_free_phase(
    force: Force,
    z0: Tensor,
    solver: SolverConfig,
    window: int = 10,
    patience: int = 30,
    measure_floor: bool = True,
) -> FreePhase:
    """Euler free phase with the noise-aware stop (module docstring). `solver.method` must be Euler."""
    if solver.method != "euler":
        raise ValueError(f"the noise-aware free phase integrates with explicit Euler, not {solver.method!r}")
    eps = solver.eps
    z = z0.detach().clone()
    history: deque[Tensor] = deque(maxlen=window + 1)
    history.append(z)
    best = math.inf
    since_best = 0
    trace: list[Tensor] = []
    trace_steps: list[int] = []
    res_w = torch.full((z.shape[0],), math.inf, dtype=z.dtype)
    raw = res_w
    converged = at_floor = False
    steps = 0
    n_evals = 0
    with torch.no_grad():
        for step in range(1, solver.max_steps + 1):
            f = force(z)
            n_evals += 1
            if not bool(torch.isfinite(f).all()):
                bad = (~torch.isfinite(f.reshape(f.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
                raise NonFiniteStateError("force", step, "euler", bad)
            raw = one_step_residual(z, f, eps)
            z = z + eps * f
            steps = step
            history.append(z)
            if len(history) == window + 1:
                mean = _window_mean(history)
                res_w = _per_sample_norm(history[-1] - history[0]) / (
                    window * _per_sample_norm(mean).clamp_min(torch.finfo(z.dtype).eps)
                )
                trace.append(res_w.clone())
                trace_steps.append(step)
                worst = float(res_w.max())
                if worst < best * (1.0 - 1e-3):
                    best, since_best = worst, 0
                else:
                    since_best += 1
                if step >= solver.min_steps:
                    if worst <= solver.tol:
                        converged = True
                        break
                    if since_best >= patience:
                        at_floor = True
                        break
        z_out = _window_mean(history) if len(history) == window + 1 else z
        floor_b = torch.zeros(z.shape[0], dtype=z.dtype)
        if measure_floor:
            f1, f2 = force(z_out), force(z_out)
            n_evals += 2
            floor_b = eps * _per_sample_norm(f1 - f2) / (math.sqrt(2.0) * _per_sample_norm(z_out).clamp_min(1e-30))
    if not trace:  # fewer steps than the window: fall back on the one-step residual
        res_w = raw
        trace.append(raw.clone())
        trace_steps.append(steps)
    result = RelaxResult(
        z=z_out,
        converged=converged,
        residual=res_w,
        residual_max=float(res_w.max()),
        trace=torch.stack(trace),
        n_force_evals=n_evals,
        sim_time=steps * eps,
        n_steps=steps,
        method="euler",
        trace_steps=torch.tensor(trace_steps),
        notes=["noise-aware stop: at the floor"] if at_floor else [],
    )
    return FreePhase(result, float(res_w.max()), float(raw.max()), float(floor_b.max()), at_floor, steps)
