"""The free phase: integrate dz/dt = F(z) (time in units of tau) to its fixed point.

One entry point, `relax(force, z0, cfg, *, stop=None) -> RelaxResult`, and a solver registry
(`SOLVERS`: name -> `solver(force, z0, cfg, stop) -> RelaxResult`, per-sample residuals in the
result). `SolverConfig.method` names the solver; a new solver is one function added to `SOLVERS`.

Stop rules (`stop`), for the Euler solver (the circuit's own integrator):
- `ResidualStop` (the default of every solver): the one-step residual below `tol` after `min_steps`.
- `WindowStop(window, patience)`: the noise-aware stop of a circuit whose reads are noisy (below).

Solvers:
- ``"euler"``: explicit Euler z <- z + eps F(z), the reference of SCIENCE §2 (eps = 0.1).
- ``"dopri5"``: adaptive embedded Runge-Kutta 5(4) of Dormand and Prince (FSAL), error control with
  rtol/atol. One step size is shared by the batch (the batch integrates one simulated time), but the
  error norm is the *maximum* over samples of each sample's RMS error, so one sample's large error is
  not averaged away.
- ``"anderson"``: Anderson acceleration (type II) of the fixed point of the Euler map
  g(z) = z + eps F(z); each sample gets its own mixing coefficients.

Whatever the solver, the residual is always the one-step relative residual of SCIENCE §2,
``res = ||eps F(z)|| / ||z||`` per sample, with ``eps = cfg.eps`` (not the adaptive step), so the
figures of every solver are comparable. Convergence means the *maximum* over samples is <= tol.

Where we differ from SCIENCE §2 / common practice (on purpose):
- `min_steps` (T1) counts Euler steps and Anderson iterations; for dopri5 it is a minimum simulated
  time of ``min_steps * eps`` (the same physical T1 as the Euler reference).
- Anderson's Tikhonov term is relative: ``lam * mean(diag(F F^H))`` is added to the Gram matrix, so
  that the regularisation does not swamp the least squares near convergence where ||F|| is tiny.
  The small (m x m) solve is done in float64 whatever the state dtype. Samples whose solve is
  singular (or non-finite) take a plain Euler-map step instead, and this is recorded in
  ``RelaxResult.notes``.
- dopri5 reaches the fixed point only as accurately as its error control allows: near z* the step
  size grows to the edge of the method's stability region and the state wanders at the level of
  rtol. Keep rtol about a decade below tol (defaults: rtol 1e-6, tol 1e-4); with rtol >= tol the
  residual can stall just above tol.
- The state returned is the final iterate, not the lowest-residual one (EP needs the final one),
  except under `WindowStop`, which returns the window mean (below).

The noise-aware stop (`WindowStop`). On the analog path every force evaluation reads every
projection once, with noise, so the one-step residual ‖εF(z)‖/‖z‖ cannot fall below a floor set by
the read noise. Euler then stops on

    res_W = ‖z_t − z_{t−W}‖ / (W ‖z̄‖)      per sample, z̄ the mean of the last W states,

the residual of the time-averaged dynamics (z_t − z_{t−W} = ε Σ F over the window, so res_W is the
one-step residual of the window-mean force; read noise averages down by √W while a true drift does
not): converged when max_b res_W ≤ tol after `min_steps`, at the floor (`at_floor`) when res_W
has not improved for `patience` steps, or at `max_steps`. With `floor_factor` κ > 0 it also stops
at the floor as soon as, for every sample, res_W ≤ κ · f̂/√W, where

    f̂ = ε · sqrt(mean over the window of ‖F_t − F_{t−1}‖² / 2) / ‖z̄‖

is the one-step residual that read noise alone produces, estimated from the window's successive
forces (the same quantity as the floor measured at the end, from two reads at one state; on a
smooth noise-free trajectory F_t − F_{t−1} = O(ε‖J‖)·F, so f̂ stays well below the drift and the
rule does not fire): the remaining drift of the averaged state is then within κ of what the noise
of a W-step mean alone gives, and waiting longer does not bring z̄ closer to the fixed point
(measured on the demo's analog path: ‖z̄_t − z̄_∞‖ stops falling at the step this rule fires
with κ = 1, while the patience rule waits ~40 more force evaluations). The state returned is z̄ (a low-pass
filtered read-out of the circuit, the best estimate of the fixed point under noise). The floor is
measured at the end: two independent reads of F at z̄ give floor = ε‖F₁ − F₂‖/(√2‖z̄‖), the
one-step residual that read noise alone produces (exactly 0 on a noise-free force). The
result's `residual` is res_W, `residual_raw` the last one-step residual, `floor` the floor.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from ept_hw.config import ConfigError, check_choice, check_positive_int, check_range
from ept_hw.ops import all_finite

__all__ = [
    "SolverConfig",
    "RelaxResult",
    "StopRule",
    "ResidualStop",
    "WindowStop",
    "SOLVERS",
    "NotConvergedError",
    "NonFiniteStateError",
    "one_step_residual",
    "relax",
    "dopri5_trajectory",
]

logger = logging.getLogger(__name__)

Force = Callable[[Tensor], Tensor]



@dataclass(frozen=True)
class SolverConfig:
    method: str = "euler"  # "euler" | "dopri5" | "anderson"
    eps: float = 0.1  # Euler step in units of tau; also the epsilon of the residual definition
    tol: float = 1e-4  # converged when the max over samples of the residual <= tol
    min_steps: int = 0  # T1: run at least this many steps before testing tol
    max_steps: int = 300  # cap (steps / iterations); non-convergence is then flagged
    rtol: float = 1e-6
    atol: float = 1e-8
    max_dt: float = 10.0
    anderson_m: int = 5
    anderson_lam: float = 1e-4
    anderson_beta: float = 1.0
    check_every: int = 1  # evaluate the residual every k steps (Euler gets it for free)

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(SOLVERS))
        check_range("eps", self.eps, 0.0, None, lo_open=True)
        check_range("tol", self.tol, 0.0, None)
        check_positive_int("min_steps", self.min_steps, minimum=0)
        check_positive_int("max_steps", self.max_steps, minimum=1)
        if self.min_steps > self.max_steps:
            raise ConfigError("min_steps", self.min_steps, f"an integer <= max_steps ({self.max_steps})")
        check_range("rtol", self.rtol, 0.0, 1.0, lo_open=True)
        check_range("atol", self.atol, 0.0, None)
        check_range("max_dt", self.max_dt, 0.0, None, lo_open=True)
        check_positive_int("anderson_m", self.anderson_m, minimum=1)
        check_range("anderson_lam", self.anderson_lam, 0.0, None)
        check_range("anderson_beta", self.anderson_beta, 0.0, 2.0, lo_open=True, hi_open=True)
        check_positive_int("check_every", self.check_every, minimum=1)


@dataclass
class RelaxResult:
    z: Tensor  # final state (not the lowest-residual iterate: EP needs the final one)
    converged: bool
    residual: Tensor  # (B,) final per-sample residual (SCIENCE §2 definition)
    residual_max: float  # max over samples
    trace: Tensor  # (n_checks, B) per-sample residual trace
    n_force_evals: int
    sim_time: float  # simulated time in units of tau (anderson: nan)
    n_steps: int  # Euler steps, accepted dopri5 steps, or Anderson iterations
    method: str = "euler"
    trace_steps: Tensor | None = None  # (n_checks,) step index of each trace row
    notes: list[str] = field(default_factory=list)  # fallbacks, rejected steps, ...
    n_fallbacks: int = 0  # Anderson: sample-iterations that fell back to plain iteration
    residual_raw: Tensor | None = None  # (B,) last one-step residual where `residual` is another (WindowStop)
    floor: Tensor | None = None  # (B,) one-step residual of read noise alone (WindowStop), else None
    at_floor: bool = False  # WindowStop: stopped because res_W stopped improving
    force_mean: Tensor | None = None  # WindowStop: mean force over the window, (z_last − z_first)/(W·ε)

    @property
    def residual_raw_max(self) -> float:
        """Max over samples of the last one-step residual (read noise included under WindowStop)."""
        return self.residual_max if self.residual_raw is None else float(self.residual_raw.max())

    @property
    def floor_max(self) -> float:
        """Max over samples of the noise floor; 0 where none was measured."""
        return 0.0 if self.floor is None else float(self.floor.max())


class NotConvergedError(RuntimeError):
    """Raised by `relax(require_converged=True)` when the tolerance was not reached."""

    def __init__(self, result: RelaxResult):
        self.result = result
        super().__init__(
            f"relaxation ({result.method}) did not converge: max residual {result.residual_max:.3e} "
            f"after {result.n_steps} steps / {result.n_force_evals} force evaluations "
            f"(worst sample {int(torch.argmax(result.residual))})"
        )


class NonFiniteStateError(FloatingPointError):
    """Raised at once when the state or the force holds NaN/inf; the message names the step."""

    def __init__(self, what: str, step: int, method: str, bad_samples: Sequence[int]):
        self.what = what
        self.step = step
        self.method = method
        self.bad_samples = list(bad_samples)
        shown = self.bad_samples[:8]
        more = "" if len(self.bad_samples) <= 8 else f" (+{len(self.bad_samples) - 8} more)"
        super().__init__(
            f"non-finite {what} at step {step} of the {method} relaxation, samples {shown}{more}"
        )


def _flat(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1) if z.ndim > 1 else z.reshape(-1, 1)


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def one_step_residual(z: Tensor, f: Tensor, eps: float) -> Tensor:
    """(B,) per-sample ||eps f|| / ||z||, norms over all dims but the first.

    Complex-safe (moduli). Guarded at z = 0: the denominator is floored at the dtype's machine
    epsilon, so a zero state with zero force gives 0 and a zero state with a force gives a large
    finite number rather than inf/NaN.
    """
    if z.shape != f.shape:
        raise ValueError(f"state shape {tuple(z.shape)} and force shape {tuple(f.shape)} differ")
    if z.ndim == 0:
        raise ValueError("the state needs a leading batch dimension")
    num = torch.linalg.vector_norm(_flat(f), dim=1) * eps
    den = torch.linalg.vector_norm(_flat(z), dim=1)
    floor = torch.finfo(den.dtype).eps
    return num / den.clamp_min(floor)


def _check_finite(t: Tensor, what: str, step: int, method: str) -> None:
    if not all_finite(t):
        bad = (~torch.isfinite(_flat(t))).any(dim=1).nonzero().flatten().tolist()
        raise NonFiniteStateError(what, step, method, bad)


def _evaluate(force: Force, z: Tensor, step: int, method: str) -> Tensor:
    f = force(z)
    if f.shape != z.shape:
        raise ValueError(f"force returned shape {tuple(f.shape)} for a state of shape {tuple(z.shape)}")
    _check_finite(f, "force", step, method)
    return f


class _Trace:
    def __init__(self) -> None:
        self.rows: list[Tensor] = []
        self.steps: list[int] = []

    def add(self, step: int, res: Tensor) -> None:
        self.rows.append(res)
        self.steps.append(step)

    def check(self, step: int, res: Tensor, cfg: "SolverConfig", last: bool) -> bool:
        """Record `res` on check steps (and the last one); True once past min_steps and within tol."""
        if step % cfg.check_every == 0 or last:
            self.add(step, res)
            return step >= cfg.min_steps and float(res.max()) <= cfg.tol
        return False

    def stack(self, batch: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        if not self.rows:
            return torch.empty(0, batch, dtype=dtype, device=device), torch.empty(0, dtype=torch.long)
        return torch.stack(self.rows), torch.tensor(self.steps, dtype=torch.long)


def relax(
    force: Force,
    z0: Tensor,
    cfg: SolverConfig,
    *,
    stop: "StopRule | None" = None,
    require_converged: bool = False,
    enable_grad: bool = False,
) -> RelaxResult:
    """Integrate dz/dt = force(z) from z0 with the solver `cfg.method` until its stop rule fires.

    `force` maps a state of shape (B, ...) to a tensor of the same shape. `stop` is the stop rule
    (default `ResidualStop`: one-step residual <= tol after min_steps, or max_steps); a rule other
    than `ResidualStop` needs the Euler solver. Runs under `torch.no_grad()` unless
    `enable_grad=True`. Non-convergence sets `converged=False` and logs a warning (with a
    `WindowStop`, whose caller logs the residual, only at INFO level, and not at all at the noise
    floor, which is the expected end of a noisy relaxation); with
    `require_converged=True` it raises `NotConvergedError` (holding the result). NaN/inf in the
    state or the force raises `NonFiniteStateError` at once.
    """
    if not isinstance(cfg, SolverConfig):
        raise TypeError(f"cfg must be a SolverConfig, got {type(cfg).__name__}")
    if not isinstance(z0, Tensor) or z0.ndim == 0:
        raise ValueError("z0 must be a tensor with a leading batch dimension (B, ...)")
    if not (z0.dtype.is_floating_point or z0.dtype.is_complex):
        raise ValueError(f"z0 must be a floating or complex tensor, got {z0.dtype}")
    stop = stop if stop is not None else ResidualStop()
    if not isinstance(stop, ResidualStop) and cfg.method != "euler":
        raise ValueError(f"the stop rule {type(stop).__name__} integrates with explicit Euler, not {cfg.method!r}")
    _check_finite(z0, "initial state", 0, cfg.method)
    with torch.set_grad_enabled(enable_grad):
        result = SOLVERS[cfg.method](force, z0, cfg, stop)
    if not result.converged:
        if not result.at_floor:
            # A noise-aware (`WindowStop`) relaxation is a training free phase whose residual the
            # caller logs on every metrics row: ending at the step cap is reported there, not as
            # a warning per step (the demo would print one every few steps).
            level = logging.WARNING if isinstance(stop, ResidualStop) else logging.INFO
            logger.log(
                level, "relaxation (%s) not converged: max residual %.3e > tol %.1e after %d steps",
                cfg.method, result.residual_max, cfg.tol, result.n_steps,
            )
        if require_converged:
            raise NotConvergedError(result)
    return result


def _finish(
    z: Tensor, res: Tensor, trace: _Trace, converged: bool, n_evals: int, sim_time: float,
    n_steps: int, cfg: SolverConfig, notes: list[str] | None = None, n_fallbacks: int = 0,
) -> RelaxResult:
    rows, steps = trace.stack(z.shape[0], res.dtype, res.device)
    return RelaxResult(
        z=z, converged=converged, residual=res, residual_max=float(res.max()), trace=rows,
        n_force_evals=n_evals, sim_time=sim_time, n_steps=n_steps, method=cfg.method,
        trace_steps=steps, notes=notes or [], n_fallbacks=n_fallbacks,
    )


# ---------------------------------------------------------------------------------- stop rules


class StopRule(Protocol):
    """When an explicit Euler relaxation stops, and what it returns (one object per relaxation).

    The Euler solver calls `start` once, then at every step `after_force` (with the force at the
    current state, before the step: True stops there) and `after_step` (with the new state: True
    stops there), and finally `finish` to build the result. `needs_final_force` says whether the
    state reached at `max_steps` is evaluated once more (for its residual) before stopping.
    """

    needs_final_force: bool

    def start(self, z0: Tensor, cfg: SolverConfig) -> None: ...

    def after_force(self, step: int, z: Tensor, f: Tensor, last: bool) -> bool: ...

    def after_step(self, step: int, z: Tensor) -> bool: ...

    def finish(self, force: Force, z: Tensor, n_evals: int, n_steps: int) -> RelaxResult: ...


class ResidualStop:
    """Converged when the one-step residual (max over samples) is <= tol after min_steps, tested
    every `check_every` steps; the final iterate is returned. The default of every solver."""

    needs_final_force = True

    def start(self, z0: Tensor, cfg: SolverConfig) -> None:
        self.cfg = cfg
        self.trace = _Trace()
        self.converged = False
        self.res: Tensor | None = None

    def after_force(self, step: int, z: Tensor, f: Tensor, last: bool) -> bool:
        self.res = one_step_residual(z, f, self.cfg.eps)
        self.converged = self.trace.check(step, self.res, self.cfg, last)
        return self.converged

    def after_step(self, step: int, z: Tensor) -> bool:
        return False

    def finish(self, force: Force, z: Tensor, n_evals: int, n_steps: int) -> RelaxResult:
        cfg = self.cfg
        return _finish(z, self.res, self.trace, self.converged, n_evals, n_steps * cfg.eps, n_steps, cfg)


class WindowStop:
    """The noise-aware stop (module docstring): res_W over a window of `window` Euler steps,
    converged at tol, at the floor after `patience` steps without improvement or (`floor_factor`
    κ > 0) once res_W is within κ of the window's own read-noise level; returns the window mean
    and, with `measure_floor`, the read-noise floor from two more reads at it."""

    needs_final_force = False

    def __init__(self, window: int = 10, patience: int = 30, measure_floor: bool = True, floor_factor: float = 0.0):
        check_positive_int("window", window)
        check_positive_int("patience", patience)
        check_range("floor_factor", floor_factor, 0.0, None)
        self.window, self.patience, self.measure_floor = window, patience, measure_floor
        # the floor rule needs at least two forces in the window
        self.floor_factor = float(floor_factor) if window >= 2 else 0.0

    def start(self, z0: Tensor, cfg: SolverConfig) -> None:
        self.cfg = cfg
        self.history: deque[Tensor] = deque(maxlen=self.window + 1)
        self.history.append(z0)
        self.best, self.since_best = math.inf, 0
        self.trace = _Trace()
        self.res_w = torch.full((z0.shape[0],), math.inf, dtype=z0.dtype, device=z0.device)
        self.raw = self.res_w
        self.converged = self.at_floor = False
        self._last_f: Tensor | None = None
        # per-sample ‖F_t − F_{t−1}‖² of the last W − 1 force pairs (the window's successive forces)
        self._df2: deque[Tensor] = deque(maxlen=self.window - 1)

    def after_force(self, step: int, z: Tensor, f: Tensor, last: bool) -> bool:
        self.raw = one_step_residual(z, f, self.cfg.eps)
        if self.floor_factor > 0.0:
            if self._last_f is not None:
                self._df2.append((f - self._last_f).reshape(f.shape[0], -1).pow(2).sum(dim=1))
            self._last_f = f
        return False

    def _mean(self) -> Tensor:
        # The last W states (history holds W + 1: the oldest is only the drift's reference).
        return torch.stack(list(self.history)[1:]).mean(dim=0)

    def after_step(self, step: int, z: Tensor) -> bool:
        h = self.history
        h.append(z)
        if len(h) < self.window + 1:
            return False
        floor = torch.finfo(z.dtype).eps
        mean_norm = _sample_norm(self._mean()).clamp_min(floor)
        self.res_w = _sample_norm(h[-1] - h[0]) / (self.window * mean_norm)
        self.trace.add(step, self.res_w.clone())
        if self.floor_factor > 0.0 and len(self._df2) == self.window - 1:
            # res_W against κ·f̂/√W, f̂ the window's read-noise floor (class docstring): one sync
            f_hat = self.cfg.eps * torch.sqrt(torch.stack(list(self._df2)).mean(dim=0) / 2.0) / mean_norm
            excess = (self.res_w * math.sqrt(self.window) - self.floor_factor * f_hat).max()
            worst, excess = torch.stack([self.res_w.max(), excess.to(self.res_w.dtype)]).tolist()
            if step >= self.cfg.min_steps and worst > self.cfg.tol and excess <= 0.0:
                self.at_floor = True
                return True
        else:
            worst = float(self.res_w.max())
        if worst < self.best * (1.0 - 1e-3):
            self.best, self.since_best = worst, 0
        else:
            self.since_best += 1
        if step >= self.cfg.min_steps:
            if worst <= self.cfg.tol:
                self.converged = True
                return True
            if self.since_best >= self.patience:
                self.at_floor = True
                return True
        return False

    def finish(self, force: Force, z: Tensor, n_evals: int, n_steps: int) -> RelaxResult:
        cfg = self.cfg
        z_out = self._mean() if len(self.history) == self.window + 1 else z
        floor_b = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        if self.measure_floor:
            f1, f2 = force(z_out), force(z_out)
            n_evals += 2
            floor_b = cfg.eps * _sample_norm(f1 - f2) / (math.sqrt(2.0) * _sample_norm(z_out).clamp_min(1e-30))
        res = self.res_w
        if not self.trace.rows:  # fewer steps than the window: fall back on the one-step residual
            res = self.raw
            self.trace.add(n_steps, self.raw.clone())
        rows, steps = self.trace.stack(z.shape[0], res.dtype, res.device)
        return RelaxResult(
            z=z_out, converged=self.converged, residual=res, residual_max=float(res.max()), trace=rows,
            n_force_evals=n_evals, sim_time=n_steps * cfg.eps, n_steps=n_steps, method="euler",
            trace_steps=steps, notes=["noise-aware stop: at the floor"] if self.at_floor else [],
            residual_raw=self.raw, floor=floor_b, at_floor=self.at_floor,
            force_mean=(self.history[-1] - self.history[0]) / (self.window * cfg.eps)
            if len(self.history) == self.window + 1 else None,
        )


def _sample_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


# --------------------------------------------------------------------------------------- Euler


def _relax_euler(force: Force, z0: Tensor, cfg: SolverConfig, stop: StopRule) -> RelaxResult:
    z = z0.clone()
    stop.start(z, cfg)
    n_evals = 0
    step = 0
    while True:
        if step >= cfg.max_steps and not stop.needs_final_force:
            break
        f = _evaluate(force, z, step, "euler")
        n_evals += 1
        last = step >= cfg.max_steps
        if stop.after_force(step, z, f, last) or last:
            break
        z = z + cfg.eps * f
        step += 1
        _check_finite(z, "state", step, "euler")
        if stop.after_step(step, z):
            break
    return stop.finish(force, z, n_evals, step)


# ------------------------------------------------------------------------------- Dormand-Prince

_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
# difference between the 5th- and the embedded 4th-order weights
_DP_E = (
    71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40,
)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0


def _error_norm(err: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float) -> float:
    """Max over samples of the per-sample RMS of err / (atol + rtol max(|y0|, |y1|))."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    ratio = _flat(err.abs() / scale)
    return float(torch.sqrt((ratio**2).mean(dim=1)).max())


def _step_factor(en: float) -> float:
    """Step-size factor from the error norm: safety·en^(−1/5), clipped to [_MIN_FACTOR, _MAX_FACTOR]."""
    if not math.isfinite(en):
        return _MIN_FACTOR
    if en == 0.0:
        return _MAX_FACTOR
    return min(_MAX_FACTOR, max(_MIN_FACTOR, _SAFETY * en ** (-1 / 5)))


def _initial_dt(force: Force, z: Tensor, f0: Tensor, cfg: SolverConfig, n_evals: list[int]) -> float:
    """Hairer-Norsett-Wanner's starting step heuristic (one extra force evaluation)."""
    scale = cfg.atol + cfg.rtol * z.abs()
    d0 = float(torch.sqrt(((_flat(z.abs() / scale)) ** 2).mean(dim=1)).max())
    d1 = float(torch.sqrt(((_flat(f0.abs() / scale)) ** 2).mean(dim=1)).max())
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, cfg.max_dt)
    f1 = _evaluate(force, z + h0 * f0, 0, "dopri5")
    n_evals[0] += 1
    d2 = float(torch.sqrt(((_flat((f1 - f0).abs() / scale)) ** 2).mean(dim=1)).max()) / h0
    if max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1 / 5)
    return min(100 * h0, h1, cfg.max_dt)


def _dopri5_step(force: Force, z: Tensor, f0: Tensor, dt: float, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince step; returns (z_new, f(z_new), error estimate)."""
    ks = [f0]
    for i in range(1, 7):
        incr = sum((a * k for a, k in zip(_DP_A[i], ks) if a != 0.0), torch.zeros_like(z))
        zi = z + dt * incr
        if i == 6:
            z_new = zi  # the 7th stage sits at the 5th-order solution (FSAL)
            _check_finite(z_new, "state", step, "dopri5")
        ks.append(_evaluate(force, zi, step, "dopri5"))
    err = dt * sum((e * k for e, k in zip(_DP_E, ks) if e != 0.0), torch.zeros_like(z))
    return z_new, ks[6], err


def _relax_dopri5(force: Force, z0: Tensor, cfg: SolverConfig, stop: StopRule) -> RelaxResult:
    z = z0.clone()
    trace = _Trace()
    counter = [0]
    f = _evaluate(force, z, 0, "dopri5")
    counter[0] += 1
    dt = _initial_dt(force, z, f, cfg, counter)
    t = 0.0
    t_min = cfg.min_steps * cfg.eps
    accepted = rejected = attempts = 0
    converged = False
    while True:
        res = one_step_residual(z, f, cfg.eps)
        last = attempts >= cfg.max_steps
        if accepted % cfg.check_every == 0 or last:
            trace.add(accepted, res)
            if t >= t_min - 1e-12 and float(res.max()) <= cfg.tol:
                converged = True
                break
        if last:
            break
        # take attempts until one is accepted (or the cap is hit)
        while attempts < cfg.max_steps:
            attempts += 1
            if t < t_min:  # land on T1 exactly so the residual test starts on time
                dt_try = min(dt, t_min - t) if t_min - t > 1e-12 else dt
            else:
                dt_try = dt
            z_new, f_new, err = _dopri5_step(force, z, f, dt_try, accepted + 1)
            counter[0] += 6
            en = _error_norm(err, z, z_new, cfg.rtol, cfg.atol)
            factor = _step_factor(en)
            if en <= 1.0:
                z, f, t = z_new, f_new, t + dt_try
                accepted += 1
                dt = min(cfg.max_dt, dt_try * factor)
                break
            rejected += 1
            dt = dt_try * min(1.0, factor)
        else:
            # cap reached inside the retry loop: record the final residual and stop
            res = one_step_residual(z, f, cfg.eps)
            trace.add(accepted, res)
            break
    notes = [f"dopri5: {accepted} accepted, {rejected} rejected steps"]
    return _finish(z, res, trace, converged, counter[0], t, accepted, cfg, notes)


def dopri5_trajectory(force: Force, z0: Tensor, t_eval: Sequence[float] | Tensor, cfg: SolverConfig | None = None) -> Tensor:
    """States at the increasing times `t_eval` (units of tau) from the adaptive Dormand-Prince solver.

    Returns a tensor of shape (len(t_eval), *z0.shape). Steps are clipped to land exactly on each
    requested time (no interpolation), with the same error control as `relax(method="dopri5")`.
    Runs under `torch.no_grad()`.
    """
    cfg = cfg or SolverConfig(method="dopri5")
    times = [float(x) for x in (t_eval.tolist() if isinstance(t_eval, Tensor) else t_eval)]
    if any(b < a for a, b in zip(times, times[1:])) or (times and times[0] < 0):
        raise ValueError("t_eval must be non-negative and non-decreasing")
    _check_finite(z0, "initial state", 0, "dopri5")
    out = []
    with torch.no_grad():
        z = z0.clone()
        counter = [0]
        f = _evaluate(force, z, 0, "dopri5")
        dt = _initial_dt(force, z, f, cfg, counter)
        t = 0.0
        step = 0
        for target in times:
            while target - t > 1e-12 * max(1.0, abs(target)):
                dt_try = min(dt, target - t)
                step += 1
                z_new, f_new, err = _dopri5_step(force, z, f, dt_try, step)
                en = _error_norm(err, z, z_new, cfg.rtol, cfg.atol)
                factor = _step_factor(en)
                if en <= 1.0:
                    z, f, t = z_new, f_new, t + dt_try
                    proposal = min(cfg.max_dt, dt_try * factor)
                    # a step clipped to land on `target` must not shrink the next one
                    dt = max(dt, proposal) if dt_try < dt else proposal
                else:
                    dt = dt_try * min(1.0, factor)
                if dt < 1e-14 * max(1.0, t):
                    raise FloatingPointError(f"dopri5 step size underflow at t = {t:g}")
            out.append(z.clone())
    return torch.stack(out) if out else torch.empty(0, *z0.shape, dtype=z0.dtype, device=z0.device)


# ------------------------------------------------------------------------------------ Anderson


def _relax_anderson(force: Force, z0: Tensor, cfg: SolverConfig, stop: StopRule) -> RelaxResult:
    """Type-II Anderson on g(z) = z + eps F(z), per-sample coefficients and per-sample restarts.

    With residuals r_i = g(x_i) - x_i = eps F(x_i) in the window, solve
    min_a ||sum a_i r_i||^2 + lam' ||a||^2 s.t. sum a_i = 1, then
    x+ = beta sum a_i g(x_i) + (1 - beta) sum a_i x_i.

    Windowed Anderson behaves like restarted GMRES and can stagnate on the block's strongly
    non-normal Jacobian (measured: one sample of a batch stuck at res ~1e-3 while plain Euler
    converged; which sample depends on 1e-12 perturbations). So a sample whose residual
    rises above `_RESTART_GROWTH` x its best, or has not halved its residual within
    `_STALL_WINDOW` x m iterations of its window's start, drops its window and restarts from the
    current iterate; a sample that stalls twice continues with plain iteration (in `notes`).
    """
    batch = z0.shape[0]
    x = z0.clone()
    m = cfg.anderson_m
    hist_x: list[Tensor] = []
    hist_r: list[Tensor] = []
    hist_it: list[int] = []
    start_it = torch.zeros(batch, dtype=torch.long)
    best = torch.full((batch,), float("inf"), dtype=torch.float64)
    best_it = torch.zeros(batch, dtype=torch.long)
    start_res = torch.full((batch,), float("inf"), dtype=torch.float64)
    strikes = torch.zeros(batch, dtype=torch.long)
    plain_only = torch.zeros(batch, dtype=torch.bool)
    trace = _Trace()
    notes: list[str] = []
    n_fallbacks = n_restarts = 0
    n_evals = 0
    it = 0
    converged = False
    solve_dtype = torch.complex128 if x.dtype.is_complex else torch.float64
    while True:
        f = _evaluate(force, x, it, "anderson")
        n_evals += 1
        res = one_step_residual(x, f, cfg.eps)
        last = it >= cfg.max_steps
        if trace.check(it, res, cfg, last):
            converged = True
            break
        if last:
            break
        # per-sample safeguards: restart a window that blew up or stalls; a sample that stalls
        # twice is handed to plain iteration (it then converges wherever Euler does)
        res64 = res.detach().to(torch.float64).cpu()
        improved = res64 < best
        best = torch.where(improved, res64, best)
        best_it = torch.where(improved, torch.full_like(best_it, it), best_it)
        window_age = it - start_it
        grew = res64 > _RESTART_GROWTH * best
        stalled = (window_age >= _STALL_WINDOW * m) & (res64 > _STALL_FACTOR * start_res)
        restart = (grew | stalled) & (window_age > 0) & ~plain_only
        if bool(restart.any()):
            n_restarts += int(restart.sum())
            strikes = strikes + stalled.long() * restart.long()
            give_up = restart & (strikes >= 2)
            if bool(give_up.any()):
                plain_only = plain_only | give_up
                notes.append(f"anderson: samples {give_up.nonzero().flatten().tolist()[:8]} stalled twice, "
                             f"plain iteration from iteration {it}")
            start_it = torch.where(restart, torch.full_like(start_it, it), start_it)
            start_res = torch.where(restart, res64, start_res)
        start_res = torch.where(start_it == it, res64, start_res)

        r = cfg.eps * f
        hist_x.append(_flat(x))
        hist_r.append(_flat(r))
        hist_it.append(it)
        if len(hist_x) > m:
            hist_x.pop(0)
            hist_r.pop(0)
            hist_it.pop(0)
        k = len(hist_x)
        X = torch.stack(hist_x, dim=1)  # (B, k, n)
        R = torch.stack(hist_r, dim=1)
        plain = X[:, -1] + cfg.anderson_beta * R[:, -1]
        valid = torch.tensor(hist_it)[None, :] >= start_it[:, None]  # (B, k)
        use = (valid.sum(dim=1) > 1) & ~plain_only
        if k == 1 or not bool(use.any()):
            new = plain
        else:
            valid_d = valid.to(device=x.device)
            vmask = valid_d.to(solve_dtype)
            Rd = R.to(solve_dtype) * vmask[:, :, None]
            gram = Rd @ Rd.transpose(1, 2).conj()  # (B, k, k); zero rows/cols for invalid entries
            n_valid = valid_d.sum(dim=1).clamp_min(1)
            diag_mean = gram.diagonal(dim1=1, dim2=2).real.sum(dim=1) / n_valid  # (B,)
            lam = cfg.anderson_lam * diag_mean
            eye = torch.eye(k, dtype=solve_dtype, device=x.device)
            # bordered system [[0, 1^T], [1, H]] [nu; a] = [1; 0]; invalid entries get a_j = 0
            H = torch.zeros(batch, k + 1, k + 1, dtype=solve_dtype, device=x.device)
            H[:, 0, 1:] = vmask
            H[:, 1:, 0] = vmask
            H[:, 1:, 1:] = gram + (lam[:, None] * vmask)[:, :, None] * eye + torch.diag_embed(1 - vmask)
            rhs = torch.zeros(batch, k + 1, 1, dtype=solve_dtype, device=x.device)
            rhs[:, 0] = 1
            sol, info = torch.linalg.solve_ex(H, rhs)
            alpha = sol[:, 1:, 0]  # (B, k)
            at_rest = diag_mean == 0  # exactly zero residual: a plain step leaves it there
            ok = (info == 0) & torch.isfinite(alpha).all(dim=1) & ~at_rest & use.to(x.device)
            alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha)).to(x.dtype)
            G = X + R
            mixed_g = (alpha[:, :, None] * G).sum(dim=1)
            mixed_x = (alpha[:, :, None] * X).sum(dim=1)
            new = cfg.anderson_beta * mixed_g + (1 - cfg.anderson_beta) * mixed_x
            new = torch.where(ok[:, None], new, plain)
            failed = ~ok & ~at_rest & use.to(x.device)
            if bool(failed.any()):
                bad = failed.nonzero().flatten()
                n_fallbacks += int(bad.numel())
                notes.append(
                    f"anderson: singular least squares at iteration {it}, samples "
                    f"{bad.tolist()[:8]} fell back to plain iteration"
                )
                logger.info(notes[-1])
        x = new.reshape(x.shape)
        it += 1
        _check_finite(x, "state", it, "anderson")
    if n_restarts:
        notes.append(f"anderson: {n_restarts} per-sample window restarts")
    return _finish(x, res, trace, converged, n_evals, float("nan"), it, cfg, notes, n_fallbacks)


#: The solver registry: `SolverConfig.method` -> solver(force, z0, cfg, stop) -> RelaxResult. Only
#: Euler takes stop rules other than `ResidualStop` (`relax` refuses the others).
SOLVERS: dict[str, Callable[..., RelaxResult]] = {
    "euler": _relax_euler,
    "dopri5": _relax_dopri5,
    "anderson": _relax_anderson,
}

_RESTART_GROWTH = 10.0  # restart when the residual exceeds this multiple of the sample's best
_STALL_WINDOW = 4  # a window is judged after this many multiples of m iterations ...
_STALL_FACTOR = 0.5  # ... and stalls if the residual has not halved since the window started
