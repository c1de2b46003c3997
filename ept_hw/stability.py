"""Stability instruments for the relaxation dz/dt = F(z) (SCIENCE §4, issue 6).

Generic over a force closure ``force: z -> F(z)`` (state (B, ...), real dtype):

- `leading_eigenvalues`: leading eigenvalues of the relaxation map M = I + eps J at an operating
  point, by ARPACK (`scipy.sparse.linalg.eigs`) on a matrix-free `LinearOperator`. Two Arnoldi
  runs, because the two figures that matter are different eigenvalues in general:
  ``which="LR"`` on J gives the largest Re mu (the Hopf signal; mu = (lambda - 1)/eps), and
  ``which="LM"`` on M gives the largest |lambda| (what the Euler iteration feels). |lambda| > 1 with
  Re mu < 0 is an Euler-step artefact, not a Hopf.
- `find_operating_point`: z* when the relaxation converges, else the relaxed state after a long run
  (as the precursor did), with its residual and a label saying which.
- `detect_limit_cycle`: a long Euler relaxation with a verdict converged / slow / limit cycle /
  divergent, residual floor, tail slope, non-monotone fraction and dominant period (FFT of a random
  projection of z of the worst sample).
- `eigreg_penalty`: the soft one-sided penalty on the leading map eigenvalue above a margin, from a
  matvec-only subspace iteration on the leading (complex) pair, differentiable in the parameters
  through a Rayleigh quotient of the detached subspace.

Jacobian-vector products: forward-mode autograd (`torch.func.jvp`) where F supports it, central
finite differences otherwise, with a step relative to ||z|| and an absolute floor (so the origin
works). In ``"auto"`` mode the two are compared on one probe and finite differences are used when
forward mode disagrees (e.g. returns 0 through detached code: the precursor's trap, SCIENCE §4).
On the analog path run these on the arrays' effective (noise-free characterisation) weights:
Jacobian products through noisy reads make Arnoldi ill-posed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs
from torch import Tensor

from ept_hw.config import check_choice, check_positive_int, check_range
from ept_hw.ops import PortRecorder, all_finite
from ept_hw.relaxation import NonFiniteStateError, SolverConfig, one_step_residual, relax

__all__ = [
    "make_jvp",
    "dense_jacobian",
    "EigenReport",
    "leading_eigenvalues",
    "OperatingPoint",
    "find_operating_point",
    "CycleReport",
    "detect_limit_cycle",
    "EigRegConfig",
    "EigRegResult",
    "eigreg_penalty",
    "leading_pair_from_2x2",
    "model_force",
    "worst_sample",
    "eigenvalues_at_worst",
    "stability_report",
    "attention_knockout",
    "model_eigreg",
]

logger = logging.getLogger(__name__)

Force = Callable[[Tensor], Tensor]
JvpMode = Literal["auto", "forward", "fd"]


# ------------------------------------------------------------------------- Jacobian products



def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    """Where a random draw is made: the generator's device, or `like`'s with the default generator."""
    return generator.device if generator is not None else like.device

def _fd_step(z: Tensor, rel_step: float | None, abs_floor: float) -> float:
    """Central-difference step: rel_step * max(||z||_rms, floor); rel_step ~ cbrt(machine eps)."""
    if rel_step is None:
        rel_step = float(torch.finfo(z.dtype).eps) ** (1 / 3)
    scale = float(torch.linalg.vector_norm(z)) / math.sqrt(max(z.numel(), 1))
    return rel_step * max(scale, abs_floor)


def _fd_jvp(force: Force, z: Tensor, v: Tensor, h: float) -> Tensor:
    """(F(z + h u) - F(z - h u)) / (2h) * ||v|| with u = v/||v||, so h is a step in state space."""
    vn = torch.linalg.vector_norm(v)
    if float(vn) == 0.0:
        return torch.zeros_like(v)
    # normalise per state, not per entry: the step is h in RMS units of the state
    u = v / vn * math.sqrt(v.numel())
    return (force(z + h * u) - force(z - h * u)) / (2 * h) * (vn / math.sqrt(v.numel()))


def _forward_jvp(force: Force, z: Tensor, v: Tensor) -> Tensor:
    return torch.func.jvp(force, (z,), (v,))[1]


def _dual_jvp(force: Force, z: Tensor, v: Tensor) -> Tensor:
    """J v by forward-mode dual numbers (`torch.autograd.forward_ad`): the same derivative as
    `torch.func.jvp` without its transform machinery (a few F per product instead of ~10 at the
    demo size), for callers that need no graph through the product."""
    with fwAD.dual_level():
        return fwAD.unpack_dual(force(fwAD.make_dual(z, v))).tangent


def make_jvp(
    force: Force,
    z: Tensor,
    mode: JvpMode = "auto",
    *,
    fd_rel_step: float | None = None,
    fd_abs_floor: float = 1e-3,
    generator: torch.Generator | None = None,
    differentiable: bool = True,
) -> tuple[Callable[[Tensor], Tensor], str]:
    """Return (v -> J v at z, mode used). Differentiable in the force's parameters either way,
    unless `differentiable=False`: forward mode then uses dual numbers (`_dual_jvp`, cheaper; for
    products taken under no_grad, such as the eigenvalue monitor's).

    "auto": forward mode, checked against finite differences on one random probe; if forward mode
    raises or disagrees by more than 1e-2 (relative; e.g. it returns 0 through detached code),
    finite differences are used.
    """
    check_choice("jvp", mode, ("auto", "forward", "fd"))
    # z is kept as given: a caller that wants gradients in z (or a graph through it) passes a leaf
    h = _fd_step(z.detach(), fd_rel_step, fd_abs_floor)

    def fd(v: Tensor) -> Tensor:
        return _fd_jvp(force, z, v, h)

    def fwd(v: Tensor) -> Tensor:
        return _forward_jvp(force, z, v) if differentiable else _dual_jvp(force, z, v)

    if mode == "fd":
        return fd, "fd"
    if mode == "forward":
        return fwd, "forward"
    probe = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=_draw_device(generator, z)).to(z.device)
    try:
        with torch.no_grad():
            a = fwd(probe)
    except Exception as exc:  # noqa: BLE001 - any unsupported op sends us to finite differences
        logger.info("forward-mode jvp unavailable (%s); using finite differences", exc)
        return fd, "fd"
    with torch.no_grad():
        b = fd(probe)
    mismatch = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
    if not math.isfinite(mismatch) or mismatch > 1e-2:
        logger.warning("forward-mode jvp disagrees with finite differences (rel %.2e); using finite differences", mismatch)
        return fd, "fd"
    return fwd, "forward"


def dense_jacobian(force: Force, z: Tensor, mode: JvpMode = "forward") -> Tensor:
    """Dense (n, n) Jacobian of the flattened force at z, column by column (small states only)."""
    jv, _ = make_jvp(force, z, mode)
    n = z.numel()
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        cols = [jv(eye[i].reshape(z.shape)).reshape(-1) for i in range(n)]
    return torch.stack(cols, dim=1)


# ------------------------------------------------------------------------- leading eigenvalues


@dataclass
class EigenReport:
    eps: float
    lambdas: np.ndarray  # map eigenvalues lambda = 1 + eps mu, the LM run (largest |lambda| first)
    mus: np.ndarray  # continuous eigenvalues from the LR run on J (largest Re mu first)
    lead_re_mu: float  # largest Re mu
    lead_im_mu: float  # Im mu of that eigenvalue (sign: the non-negative member of a pair)
    lead_abs_lambda: float  # largest |lambda| of I + eps J
    lead_abs_lambda_mu: complex  # mu of that eigenvalue
    euler_artefact: bool  # |lambda| > 1 while Re mu < 0: Euler step too large, not a Hopf
    n_matvecs: int
    jvp_mode: str
    method: str  # "arpack" or "dense" (small states)
    converged: bool  # ARPACK converged for both runs
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = [[float(x.real), float(x.imag)] for x in self.lambdas]
        d["mus"] = [[float(x.real), float(x.imag)] for x in self.mus]
        d["lead_abs_lambda_mu"] = [float(self.lead_abs_lambda_mu.real), float(self.lead_abs_lambda_mu.imag)]
        return d


def _sort_desc(values: np.ndarray, key) -> np.ndarray:
    return values[np.argsort(-key(values), kind="stable")]


def leading_eigenvalues(
    force: Force,
    z: Tensor,
    eps: float = 0.1,
    *,
    k: int = 6,
    jvp: JvpMode = "auto",
    tol: float = 1e-10,
    ncv: int | None = None,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    dense_below: int = 64,
) -> EigenReport:
    """Leading eigenvalues of M = I + eps J(z), J = dF/dz over the whole flattened (batch) state.

    The batch Jacobian is block diagonal (samples do not interact), so the leading eigenvalue over
    the batch is the worst sample's. States with fewer than `dense_below` entries (or too few for
    ARPACK's k < n - 1) use a dense eigendecomposition from n matvecs instead.
    """
    check_range("eps", eps, 0.0, None, lo_open=True)
    check_positive_int("k", k)
    if z.dtype.is_complex:
        raise ValueError("leading_eigenvalues needs a real state")
    z = z.detach()
    jv, mode = make_jvp(force, z, jvp, generator=generator, differentiable=False)  # products under no_grad
    n = z.numel()
    count = [0]
    notes: list[str] = []

    def matvec_j(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        v = torch.as_tensor(np.ascontiguousarray(x).real, dtype=z.dtype, device=z.device).reshape(z.shape)
        with torch.no_grad():
            out = jv(v)
        if not all_finite(out):
            raise NonFiniteStateError("Jacobian-vector product", count[0], "eigenvalues", [])
        return out.reshape(-1).to(torch.float64).cpu().numpy()

    converged = True
    if n < max(dense_below, k + 3):
        cols = np.stack([matvec_j(np.eye(n)[i]) for i in range(n)], axis=1)
        ev = np.linalg.eigvals(cols)
        mus = _sort_desc(ev, np.real)[: max(k, 1)]
        lambdas = _sort_desc(1 + eps * ev, np.abs)[: max(k, 1)]
        method = "dense"
    else:
        v0 = torch.randn(n, generator=generator, dtype=torch.float64).numpy()
        ncv_ = ncv or min(n - 1, max(2 * k + 1, 24))
        op_j = LinearOperator((n, n), matvec=matvec_j, dtype=np.float64)
        op_m = LinearOperator((n, n), matvec=lambda x: x + eps * matvec_j(x), dtype=np.float64)
        runs = {}
        for name, op, which in (("LR", op_j, "LR"), ("LM", op_m, "LM")):
            try:
                runs[name] = eigs(op, k=k, which=which, v0=v0, ncv=ncv_, tol=tol, maxiter=maxiter,
                                  return_eigenvectors=False)
            except ArpackNoConvergence as exc:
                converged = False
                runs[name] = exc.eigenvalues
                notes.append(f"ARPACK {which} did not converge: {len(exc.eigenvalues)} of {k} eigenvalues")
                if len(exc.eigenvalues) == 0:
                    raise
        mus = _sort_desc(np.asarray(runs["LR"]), np.real)
        lambdas = _sort_desc(np.asarray(runs["LM"]), np.abs)
        method = "arpack"
    lead_mu = mus[0]
    lead_lam = lambdas[0]
    lead_lam_mu = complex((lead_lam - 1) / eps)
    return EigenReport(
        eps=eps, lambdas=lambdas, mus=mus, lead_re_mu=float(lead_mu.real), lead_im_mu=float(abs(lead_mu.imag)),
        lead_abs_lambda=float(abs(lead_lam)), lead_abs_lambda_mu=lead_lam_mu,
        euler_artefact=bool(abs(lead_lam) > 1 and lead_mu.real < 0), n_matvecs=count[0], jvp_mode=mode,
        method=method, converged=converged, notes=notes,
    )


# ------------------------------------------------------------------------- operating point


@dataclass
class OperatingPoint:
    z: Tensor
    converged: bool
    residual_max: float
    label: str  # "z*" or "relaxed state after N steps (not converged)"
    n_steps: int


def find_operating_point(
    force: Force,
    z0: Tensor,
    cfg: SolverConfig | None = None,
    *,
    long_steps: int = 3000,
    search_unstable: bool = True,
) -> OperatingPoint:
    """The point the eigenvalues are taken at.

    1. z* if `relax` converges under cfg (label "z*");
    2. otherwise Euler is continued to `long_steps` steps in all; if that converges, "z*";
    3. otherwise (`search_unstable`) Newton-Krylov (scipy), which does not follow the dynamics,
       is started from the relaxed state: past a Hopf bifurcation the fixed point usually still
       exists but repels, and its Jacobian is the one that carries the Hopf signal (label
       "unstable z* ..."). Anderson was tried first and does not find it;
    4. failing that, the relaxed state after the long run, labelled as such: its Jacobian depends
       on where on the cycle the run stopped, so its eigenvalues are indicative only.
    """
    cfg = cfg or SolverConfig()
    res = relax(force, z0, cfg)
    if res.converged:
        return OperatingPoint(res.z, True, res.residual_max, "z*", res.n_steps)
    more = max(long_steps - res.n_steps, 1)
    cont = relax(force, res.z, SolverConfig(method="euler", eps=cfg.eps, tol=cfg.tol, max_steps=more))
    steps = res.n_steps + cont.n_steps
    if cont.converged:
        return OperatingPoint(cont.z, True, cont.residual_max, "z*", steps)
    if search_unstable:
        fp = _newton_krylov_fixed_point(force, cont.z, cfg.eps)
        if fp is not None:
            with torch.no_grad():
                r = float(one_step_residual(fp, force(fp), cfg.eps).max())
            if r <= cfg.tol:
                return OperatingPoint(fp, True, r, "unstable z* (Newton-Krylov; the relaxation does not reach it)", steps)
    return OperatingPoint(cont.z, False, cont.residual_max,
                          f"relaxed state after {steps} steps (not converged)", steps)


def _newton_krylov_fixed_point(force: Force, z: Tensor, eps: float, maxiter: int = 60) -> Tensor | None:
    """F(z) = 0 by scipy's Newton-Krylov from z (float64 numpy round trip); None if it fails."""
    from scipy.optimize import NoConvergence, newton_krylov

    shape, dtype = z.shape, z.dtype

    def fn(v: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = force(torch.as_tensor(v, dtype=dtype, device=z.device).reshape(shape))
        return out.reshape(-1).to(torch.float64).cpu().numpy()

    scale = max(float(z.detach().abs().max()), 1.0)
    f_tol = max(1e-10, 10 * float(torch.finfo(dtype).eps)) * scale / eps
    try:
        sol = newton_krylov(fn, z.detach().reshape(-1).to(torch.float64).cpu().numpy(), f_tol=f_tol, maxiter=maxiter)
    except (NoConvergence, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        logger.info("Newton-Krylov found no fixed point: %s", type(exc).__name__)
        return None
    out = torch.as_tensor(sol, dtype=dtype, device=z.device).reshape(shape)
    return out if all_finite(out) else None


# ------------------------------------------------------------------------- limit cycles

VERDICTS = ("converged", "slow", "limit cycle", "divergent")


@dataclass
class CycleReport:
    verdict: str  # one of VERDICTS
    final_residual: float  # max over samples at the last step
    residual_floor: float  # median over the tail of the max-over-samples residual
    tail_slope: float  # d ln(res) / dt over the tail, per unit tau (worst sample)
    non_monotone_fraction: float  # fraction of tail steps where the residual rises (worst sample)
    period: float  # dominant period in tau (nan if no clear peak)
    peak_power_fraction: float  # share of the tail's spectral power in the peak
    n_steps: int
    eps: float
    worst_sample: int
    residual_trace: np.ndarray  # (n_steps + 1,) max over samples
    time_to_tol: float = float("nan")  # "slow": extrapolated simulated time still needed
    reason: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["residual_trace"] = None
        return d


def _dominant_period(signal: np.ndarray, dt: float) -> tuple[float, float]:
    x = signal - signal.mean()
    if not np.any(x):
        return float("nan"), 0.0
    x = x * np.hanning(len(x))
    pad = 8 * len(x)
    spec = np.abs(np.fft.rfft(x, n=pad)) ** 2
    spec[0] = 0.0
    i = int(np.argmax(spec))
    # parabolic refinement of the peak on the log spectrum
    if 0 < i < len(spec) - 1 and spec[i - 1] > 0 and spec[i + 1] > 0:
        a, b, c = np.log(spec[i - 1]), np.log(spec[i]), np.log(spec[i + 1])
        denom = a - 2 * b + c
        shift = 0.5 * (a - c) / denom if denom != 0 else 0.0
    else:
        shift = 0.0
    freq = (i + shift) / (pad * dt)
    width = 8 * 2  # the Hann main lobe spans about 2 raw bins = 16 padded bins each side
    lo, hi = max(i - width, 0), min(i + width + 1, len(spec))
    frac = float(spec[lo:hi].sum() / spec.sum())
    return (1.0 / freq if freq > 0 else float("nan")), frac


def detect_limit_cycle(
    force: Force,
    z0: Tensor,
    *,
    eps: float = 0.1,
    n_steps: int = 3000,
    tol: float = 1e-4,
    tail_fraction: float = 0.5,
    slow_decay: float = math.log(2.0),
    blowup: float = 1e6,
    generator: torch.Generator | None = None,
) -> CycleReport:
    """Long Euler relaxation and a verdict.

    - divergent: NaN/inf, or ||z|| grew by `blowup`, or the tail residual grows past 1;
    - converged: the max-over-samples residual reached `tol` (the run stops there);
    - slow: over the tail the worst sample's residual still falls by more than e^slow_decay
      (a factor 2 by default); `time_to_tol` extrapolates the remaining time;
    - limit cycle: a floor above tol that no longer falls (bounded, the state keeps moving);
      the period is the dominant one in a random projection of the worst sample's z.
    """
    check_range("eps", eps, 0.0, None, lo_open=True)
    check_positive_int("n_steps", n_steps, minimum=8)
    check_range("tail_fraction", tail_fraction, 0.0, 1.0, lo_open=True)
    z = z0.detach().clone()
    batch = z.shape[0]
    w = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=_draw_device(generator, z)).to(z.device)
    w = w / torch.linalg.vector_norm(w.reshape(batch, -1), dim=1).reshape((batch,) + (1,) * (z.ndim - 1))
    norm0 = float(torch.linalg.vector_norm(z.reshape(batch, -1), dim=1).max().clamp_min(1e-30))
    res_rows: list[np.ndarray] = []
    proj_rows: list[np.ndarray] = []
    verdict = None
    reason = ""
    with torch.no_grad():
        for step in range(n_steps + 1):
            f = force(z)
            finite = all_finite(f)
            if not finite:
                verdict, reason = "divergent", f"non-finite force at step {step}"
                break
            res = one_step_residual(z, f, eps)
            res_rows.append(res.cpu().numpy().astype(np.float64))
            proj_rows.append((z * w).reshape(batch, -1).sum(dim=1).cpu().numpy().astype(np.float64))
            if float(res.max()) <= tol:
                verdict, reason = "converged", f"residual <= {tol:g} at step {step}"
                break
            if step == n_steps:
                break
            z = z + eps * f
            if not all_finite(z):
                verdict, reason = "divergent", f"non-finite state at step {step + 1}"
                break
            norm = float(torch.linalg.vector_norm(z.reshape(batch, -1), dim=1).max())
            if norm > blowup * norm0:
                verdict, reason = "divergent", f"||z|| grew by {norm / norm0:.1e} at step {step + 1}"
                break
    res_arr = np.stack(res_rows) if res_rows else np.zeros((1, batch))
    proj_arr = np.stack(proj_rows) if proj_rows else np.zeros((1, batch))
    worst = int(np.argmax(res_arr[-1]))
    trace = res_arr.max(axis=1)
    n_done = len(trace) - 1
    n_tail = max(int(len(trace) * tail_fraction), 4)
    tail = res_arr[-n_tail:, worst]
    t = np.arange(len(tail)) * eps
    with np.errstate(divide="ignore"):
        log_tail = np.log(np.maximum(tail, 1e-300))
    slope = float(np.polyfit(t, log_tail, 1)[0]) if len(tail) >= 2 else float("nan")
    non_mono = float(np.mean(np.diff(tail) > 0)) if len(tail) >= 2 else 0.0
    period, frac = _dominant_period(proj_arr[-n_tail:, worst], eps)
    floor = float(np.median(res_arr[-n_tail:].max(axis=1)))
    time_to_tol = float("nan")
    if verdict is None:
        decay = -slope * (t[-1] if len(t) else 0.0)
        if trace[-1] > 1.0 and slope > 0:
            verdict, reason = "divergent", "residual above 1 and growing"
        elif decay > slow_decay:
            verdict = "slow"
            time_to_tol = float(math.log(trace[-1] / tol) / -slope)
            reason = f"residual still falling (rate {slope:.3g}/tau), ~{time_to_tol:.3g} tau to tol"
        else:
            verdict = "limit cycle"
            reason = (f"residual floor {floor:.3g} with no decay over the tail"
                      + (f", period {period:.3g} tau" if frac > 0.3 else ", no clear period"))
    return CycleReport(
        verdict=verdict, final_residual=float(trace[-1]), residual_floor=floor, tail_slope=slope,
        non_monotone_fraction=non_mono, period=period if frac > 0.3 else float("nan"),
        peak_power_fraction=frac, n_steps=n_done, eps=eps, worst_sample=worst, residual_trace=trace,
        time_to_tol=time_to_tol, reason=reason,
    )


# ------------------------------------------------------------------------- eigreg


@dataclass(frozen=True)
class EigRegConfig:
    """eigreg's settings (the run's `[stabilisers.eigreg]` table). The map's ε (I + εJ) is the
    relaxation's Euler step, passed to `eigreg_penalty` / `model_eigreg` with the call."""

    weight: float = 1.0
    margin: float = 0.995  # on |lambda| (on="abs_lambda") or on Re mu (on="re_mu", e.g. -0.05)
    on: str = "abs_lambda"  # "abs_lambda" | "re_mu"
    iters: int = 20  # subspace iterations per call (warm start with the returned basis)
    block: int = 8  # subspace dimension (Rayleigh-Ritz then picks the leading pair)
    jvp: str = "fd"  # "fd" | "forward" (both differentiable in the parameters)
    fd_rel_step: float = 1e-3

    def __post_init__(self) -> None:
        check_range("weight", self.weight, 0.0, None)
        check_choice("on", self.on, ("abs_lambda", "re_mu"))
        if self.on == "abs_lambda":
            check_range("margin", self.margin, 0.0, None, lo_open=True)
        else:
            check_range("margin", self.margin)
        check_positive_int("iters", self.iters, minimum=0)
        check_positive_int("block", self.block, minimum=2)
        check_choice("jvp", self.jvp, ("fd", "forward"))
        check_range("fd_rel_step", self.fd_rel_step, 0.0, 1.0, lo_open=True)


@dataclass
class EigRegResult:
    penalty: Tensor  # scalar, differentiable in the force's parameters
    lead_abs_lambda: float
    lead_re_mu: float
    lead_mu: complex
    basis: Tensor  # (n, block) orthonormal, detached: pass back as the next call's warm start
    n_matvecs: int
    state_leaf: Tensor | None = None  # the z* copy the differentiable products were taken at


def leading_pair_from_2x2(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(|lambda|_max, Re lambda of that eigenvalue, Im lambda >= 0) of a real 2x2 matrix, in closed
    form so the gradient is defined for both a complex pair and two real eigenvalues."""
    tr = h[0, 0] + h[1, 1]
    det = h[0, 0] * h[1, 1] - h[0, 1] * h[1, 0]
    disc = tr * tr / 4 - det
    if float(disc.detach()) < 0:  # complex pair: |lambda|^2 = det
        im = torch.sqrt(-disc)
        return torch.sqrt(det), tr / 2, im
    root = torch.sqrt(disc.clamp_min(1e-30))
    hi, lo = tr / 2 + root, tr / 2 - root
    lead = hi if float(hi.detach().abs()) >= float(lo.detach().abs()) else lo
    return lead.abs(), lead, torch.zeros_like(tr)


def eigreg_penalty(
    force: Force,
    z_star: Tensor,
    cfg: EigRegConfig | None = None,
    *,
    eps: float,
    basis: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigRegResult:
    """Soft one-sided penalty weight * relu(x - margin)^2 on the leading eigenvalue of I + eps J.

    Subspace iteration on a `block`-dimensional subspace with detached Jacobian products,
    Rayleigh-Ritz to pick the leading pair (a complex pair, or the two leading real modes) and its
    real 2-D basis Q, then a Rayleigh quotient H = Q^T (Q + eps J(theta) Q) of the detached Q with J Q recomputed with autograd in the parameters at fixed z*. ``penalty``
    backpropagates into whatever parameters `force` closes over (for projections: call backward,
    or `torch.autograd.grad` on their weights). x is |lambda| (on="abs_lambda") or Re mu = Re(lambda
    - 1)/eps of the same pair (on="re_mu"); subspace iteration finds the largest-|lambda| pair, which
    is the largest-Re-mu pair unless eps |mu| is large.
    """
    cfg = cfg or EigRegConfig()
    check_range("eps", eps, 0.0, None, lo_open=True)
    z = z_star.detach()
    n = z.numel()
    p = min(cfg.block, n)
    jv_nograd, _ = make_jvp(force, z, cfg.jvp, fd_rel_step=cfg.fd_rel_step)
    count = 0
    if basis is None or basis.shape[0] != n or basis.shape[1] < 2:
        basis = torch.randn(n, p, generator=generator, dtype=z.dtype, device=_draw_device(generator, z)).to(z.device)
    elif basis.shape[1] < p:
        extra = torch.randn(n, p - basis.shape[1], generator=generator, dtype=z.dtype,
                            device=_draw_device(generator, z)).to(z.device)
        basis = torch.cat([basis.to(z.dtype), extra], dim=1)
    q = torch.linalg.qr(basis[:, :p].to(z.dtype))[0]

    def map_cols(qm: Tensor) -> Tensor:
        return torch.stack([c + eps * jv_nograd(c.reshape(z.shape)).reshape(-1) for c in qm.T], dim=1)

    with torch.no_grad():
        for _ in range(cfg.iters):
            q = torch.linalg.qr(map_cols(q))[0]
            count += p
        # Rayleigh-Ritz on the p-dimensional subspace, then the real 2-D invariant subspace of the
        # leading Ritz value (its complex pair, or the two leading real Ritz vectors)
        hp = q.T @ map_cols(q)
        count += p
        vals, vecs = torch.linalg.eig(hp)
        key = vals.abs() if cfg.on == "abs_lambda" else vals.real
        order = torch.argsort(key, descending=True)
        lead = order[0]
        w = vecs[:, lead]
        if abs(float(vals[lead].imag)) > 1e-12 * max(1.0, float(vals[lead].abs())):
            pair = torch.stack([w.real, w.imag], dim=1)
        else:
            pair = torch.stack([w.real, vecs[:, order[1]].real], dim=1)
        q2 = torch.linalg.qr(q @ pair.to(q.dtype))[0]
        full_basis = q
    q = q2
    q = q.detach()
    # a leaf copy of z*: the graph then exists even when only projections (which learn through
    # their recorded ports, not through autograd leaves) depend on theta
    z_leaf = z.clone().requires_grad_(True)
    jv_graph, _ = make_jvp(force, z_leaf, cfg.jvp, fd_rel_step=cfg.fd_rel_step)
    jq = torch.stack([jv_graph(c.reshape(z.shape)).reshape(-1) for c in q.T], dim=1)
    count += 2
    h = q.T @ (q + eps * jq)
    abs_lam, re_lam, im_lam = leading_pair_from_2x2(h)
    re_mu = (re_lam - 1) / eps
    x = abs_lam if cfg.on == "abs_lambda" else re_mu
    penalty = cfg.weight * torch.relu(x - cfg.margin) ** 2
    return EigRegResult(
        penalty=penalty, lead_abs_lambda=float(abs_lam.detach()), lead_re_mu=float(re_mu.detach()),
        lead_mu=complex(float(re_mu.detach()), float(im_lam.detach()) / eps), basis=full_basis, n_matvecs=count,
        state_leaf=z_leaf,
    )


# ------------------------------------------------------------------------- the model


def model_force(model, x_in: Tensor, *, params: dict[str, Tensor] | None = None, recorder=None) -> Force:
    """The block's force closure z -> F(z; x_in) (the operating point's clamp is fixed)."""
    return lambda z: model.force(z, x_in, params=params, recorder=recorder)


def worst_sample(force: Force, z: Tensor, eps: float) -> tuple[int, Tensor]:
    """(b, res): the sample of the batch with the largest one-step residual at z, and the (B,)
    residuals. Where a diagnostic looks at one sample, it looks at this one."""
    with torch.no_grad():
        res = one_step_residual(z, force(z), eps)
    return int(torch.argmax(res)), res


def eigenvalues_at_worst(model, x_in: Tensor, z: Tensor, eps: float, **eig_kwargs) -> tuple[int, Tensor, EigenReport]:
    """`leading_eigenvalues` of the block at the worst sample of the batch state z (`worst_sample`):
    (b, per-sample residuals, report). The batch Jacobian is block diagonal, so one sample's
    Arnoldi basis is enough; `eig_kwargs` go to `leading_eigenvalues`."""
    b, res = worst_sample(model_force(model, x_in), z, eps)
    eig = leading_eigenvalues(model_force(model, x_in[b : b + 1]), z[b : b + 1], eps, **eig_kwargs)
    return b, res, eig


def stability_report(
    model,
    idx: Tensor,
    *,
    solver: SolverConfig | None = None,
    k: int = 6,
    jvp: JvpMode = "auto",
    long_steps: int = 3000,
    cycle_steps: int = 2000,
    sample: int | str = "worst",
    generator: torch.Generator | None = None,
) -> dict:
    """Everything the CLI and the trainer log about one batch: operating point, leading eigenvalues
    (of one sample: the worst by residual unless `sample` is an index), limit-cycle verdict.

    The eigenvalues are computed on one sample because the batch Jacobian is block diagonal and a
    (B T C)-sized Arnoldi basis would be wasteful; the verdict uses the whole batch. On the analog
    path call this with the effective (noise-free) weights programmed in.
    """
    solver = solver or SolverConfig(min_steps=0, tol=1e-4, max_steps=300)
    with torch.no_grad():
        x_in = model.embed(idx)
    force = model_force(model, x_in)
    op = find_operating_point(force, x_in, solver, long_steps=long_steps)
    eig_kwargs = dict(k=k, jvp=jvp, generator=generator)
    if sample == "worst":
        b, res, eig = eigenvalues_at_worst(model, x_in, op.z, solver.eps, **eig_kwargs)
    else:
        b = int(sample)
        res = worst_sample(force, op.z, solver.eps)[1]
        eig = leading_eigenvalues(model_force(model, x_in[b : b + 1]), op.z[b : b + 1], solver.eps, **eig_kwargs)
    cyc = detect_limit_cycle(force, x_in, eps=solver.eps, n_steps=cycle_steps, tol=solver.tol, generator=generator)
    return {
        "operating_point": {"label": op.label, "converged": op.converged, "residual_max": op.residual_max,
                            "n_steps": op.n_steps, "sample": b, "sample_residual": float(res[b])},
        "re_mu": eig.lead_re_mu,
        "im_mu": eig.lead_im_mu,
        "abs_lambda": eig.lead_abs_lambda,
        "euler_artefact": eig.euler_artefact,
        "eigen": eig.as_dict(),
        "verdict": cyc.verdict,
        "cycle": cyc.as_dict(),
    }


def attention_knockout(
    model,
    idx: Tensor,
    alphas=(1.0, 0.5, 0.2, 0.0),
    *,
    eps: float = 0.1,
    n_steps: int = 2000,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> list[dict]:
    """Scale W_O by alpha (attention output knocked down) and report the relaxation per alpha.

    W_O is re-programmed with alpha times its effective weight and restored from its own
    `state_dict` afterwards (on an analog array `program` adds programming noise; the restore
    does not)."""
    proj = model.projections["W_O"]
    saved = proj.state_dict()
    w0 = proj.weight.detach().clone()
    with torch.no_grad():
        x_in = model.embed(idx)
    rows = []
    try:
        for alpha in alphas:
            proj.program(w0 * float(alpha))
            cyc = detect_limit_cycle(model_force(model, x_in), x_in, eps=eps, n_steps=n_steps, tol=tol,
                                     generator=generator)
            rows.append({"alpha": float(alpha), "verdict": cyc.verdict, "residual_floor": cyc.residual_floor,
                         "final_residual": cyc.final_residual, "period": cyc.period, "n_steps": cyc.n_steps})
    finally:
        proj.load_state_dict(saved)
    return rows


def model_eigreg(
    model,
    z_star: Tensor,
    x_in: Tensor,
    cfg: EigRegConfig | None = None,
    *,
    eps: float,
    params: dict[str, Tensor] | None = None,
    basis: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[EigRegResult, dict[str, Tensor], dict[str, Tensor]]:
    """eigreg on the block: (result, projection weight gradients, digital parameter gradients).

    Projections learn through their ports: the backward of the penalty records (u, delta) at every
    read, and the weight gradient is the summed outer product (the Jacobian products read each
    projection several times). Digital parameters get gradients when `params` holds leaves that
    require grad (the model's own `params` are used otherwise, with no gradient). Gradients are
    of the penalty itself (weight included); all zero when the leading eigenvalue is under the margin.
    """
    cfg = cfg or EigRegConfig()
    recorder = PortRecorder()
    force = model_force(model, x_in.detach(), params=params, recorder=recorder)
    result = eigreg_penalty(force, z_star, cfg, eps=eps, basis=basis, generator=generator)
    leaves = {n: t for n, t in (params or {}).items() if t.requires_grad}
    weight_grads: dict[str, Tensor] = {}
    param_grads: dict[str, Tensor] = {n: torch.zeros_like(t) for n, t in leaves.items()}
    if result.penalty.requires_grad and float(result.penalty.detach()) > 0:
        inputs = list(leaves.values()) + [result.state_leaf]
        grads = torch.autograd.grad(result.penalty, inputs, allow_unused=True)
        for (n, t), g in zip(leaves.items(), grads[: len(leaves)]):
            param_grads[n] = torch.zeros_like(t) if g is None else g
        weight_grads = recorder.weight_grads()
    for name, proj in model.projections.items():
        if name not in weight_grads:
            weight_grads[name] = torch.zeros_like(proj.weight)
    return result, weight_grads, param_grads
