"""EP gradient estimators (force form, SCIENCE §3) behind one interface.

An estimator (`GradientEstimator`) maps (model, token ids, targets) to a `GradientResult`: per projection the port
quantities (u, δ) whose outer product δ uᵀ is its update, gradients of the digital parameters, the
adjoint estimate a, the free-phase `RelaxResult`, the loss and diagnostics. The exact references in
`ept_hw.references` return the same type, so every comparison is `compare_gradients(est, ref)`.

The estimate (SCIENCE §3, FIELD "adjoint first, then one vjp at z*"):
1. free phase: relax dz/dt = F(z) from x_in (adaptive T1: to the solver's tolerance);
2. K nudged phases from z*, run in lockstep as one stacked batch:
   dz_k/dt = F(z_k) − β_k ∇ℓ(z_k) − corr_k(z_k), Euler with the solver's ε;
   β_k: one-sided [β]; centered [β, −β]; holomorphic r·e^{2πik/N} (N = 2 is centered ±r);
3. adjoint a = −Re Σ_k w_k (z_k − z*), w = [1/β] one-sided, e^{−iφ_k}/(N r) holomorphic/centered;
   adaptive T2: a is snapshotted every `snapshot_every` steps from T2 to `t2sel`, and the snapshot
   with the smallest increment of a is kept;
4. ports: one vjp of ⟨a, F(z*)⟩ (digital params, embeddings through the clamp), plus the direct
   readout gradient for W_h (u = z*, δ = (softmax − onehot)/(B·T)).

AsymEP correction corr_k = (J(p) − J(p)ᵀ) v_k, real-linear (applied to Re and Im separately):
- "frozen": p = z*, v_k = z_k − z*. J v by forward-mode dual numbers, Jᵀ v from one graph built at
  z* and kept for the whole nudge (one vjp closure).
- "tracking": p = the running common mode, v_k = z_k − p (centered/holomorphic: p = Re mean_k z_k;
  one-sided: p = (z* + z_β)/2, the midpoint, with v = z_β − z*, so that F(z_β) − F(z*) ≈ J(p) v to
  second order). One dual forward gives J v and builds the graph for the Jᵀ v backward.
For the centered pair under tracking v₋ = −v₊, so one tangent serves both.

How J(p) v is formed under tracking (`jvp`):
- "dual" (reference): forward-mode dual numbers at p, about 1.5–3 F per product.
- "secant": from the forces the nudge computes anyway. Centered pair: p = (z₊ + z₋)/2,
  v = (z₊ − z₋)/2, and (F(z₊) − F(z₋))/2 = J(p) v + O(‖v‖³); one-sided: p the midpoint of z* and
  z_β, F(z_β) − F(z*) = J(p) v + O(‖v‖³) (F(z*) read once). Only Jᵀ v costs extra (one F + backward
  at p). On the analog path each F is one noisy read per projection, so the secant product carries
  the read noise of two reads (halved in the centered difference, not averaged away): this is
  physical, a circuit forming J v from its own two nudged reads would see exactly that. Real nudges
  only (one-sided, centered, holomorphic N = 2) and only with `correction = "tracking"`: frozen
  wants J(z*), which no pair of nudged forces straddles.

Differences from SCIENCE: the nudge Euler step is the free phase's ε (`SolverConfig.eps`); T2
snapshots start at T2 (the base nudge length), so t2sel ≤ T2 turns selection off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .config import ConfigError, check_choice, check_positive_int, check_range
from .model import EquilibriumTransformer
from .ops import PortRecorder, all_finite, outer_product_sum
from .relaxation import RelaxResult, SolverConfig, StopRule, one_step_residual, relax

__all__ = [
    "EstimatorConfig",
    "GradientResult",
    "GradientEstimator",
    "EPEstimator",
    "ResregResult",
    "port_quantities",
    "resreg_gradient",
    "free_phase",
    "compare_gradients",
    "nudge_betas",
]

NUDGES = ("one_sided", "centered", "holomorphic")
CORRECTIONS = ("none", "frozen", "tracking")
JVP_METHODS = ("dual", "secant")


@dataclass(frozen=True)
class EstimatorConfig:
    """EP estimator settings; defaults are the reference recipe of SCIENCE §5."""

    nudge: str = "holomorphic"  # "one_sided" | "centered" | "holomorphic"
    beta: float = 0.02  # β (one-sided, centered) or the radius r (holomorphic, `hr`)
    points: int = 2  # N, holomorphic only; N = 2 is the centered ±r pair, N ≥ 3 runs complex
    correction: str = "tracking"  # "none" | "frozen" | "tracking"
    t2: int = 20  # base nudge length (Euler steps)
    t2sel: int = 40  # horizon of the snapshot selection; <= t2 turns selection off
    snapshot_every: int = 5
    jvp: str = "dual"  # J v under tracking: "dual" (forward-mode) | "secant" (from the nudged forces)

    def __post_init__(self) -> None:
        check_choice("nudge", self.nudge, NUDGES)
        check_range("beta", self.beta, 0.0, lo_open=True)
        check_positive_int("points", self.points, 2)
        check_choice("correction", self.correction, CORRECTIONS)
        check_positive_int("t2", self.t2)
        check_positive_int("t2sel", self.t2sel, 0)
        check_positive_int("snapshot_every", self.snapshot_every)
        if self.nudge != "holomorphic" and self.points != 2:
            raise ConfigError("points", self.points, "2 unless nudge = 'holomorphic'")
        check_choice("jvp", self.jvp, JVP_METHODS)
        if self.jvp == "secant" and self.correction == "frozen":
            raise ConfigError("jvp", self.jvp, "'dual' with correction = 'frozen' (secant needs tracking)")
        if self.jvp == "secant" and self.nudge == "holomorphic" and self.points > 2:
            raise ConfigError("jvp", self.jvp, "'dual' for holomorphic N >= 3 (secant needs real nudges)")

    @property
    def n_steps(self) -> int:
        return max(self.t2, self.t2sel)


def nudge_betas(cfg: EstimatorConfig) -> tuple[list[complex], list[complex]]:
    """(β_k, w_k) with a = −Re Σ_k w_k (z_k − z*)."""
    if cfg.nudge == "one_sided":
        return [cfg.beta], [1.0 / cfg.beta]
    if cfg.nudge == "centered":
        return [cfg.beta, -cfg.beta], [1.0 / (2 * cfg.beta), -1.0 / (2 * cfg.beta)]
    n, r = cfg.points, cfg.beta
    phases = [2 * math.pi * k / n for k in range(n)]
    betas = [r * complex(math.cos(p), math.sin(p)) for p in phases]
    weights = [complex(math.cos(p), -math.sin(p)) / (n * r) for p in phases]
    if n == 2:  # exactly the real centered pair
        betas, weights = [r, -r], [1.0 / (2 * r), -1.0 / (2 * r)]
    return betas, weights


@dataclass
class GradientResult:
    """Gradient of the mean CE in the per-group layout shared by estimators and references.

    `ports[name] = (u, δ)` for a single read at z* (EP, implicit reference); `bptt_gradient`
    leaves them empty (its projections are read at every step) and `BPTTReference` fills them in
    dense port form; `weight_grads[name] = Σ δ uᵀ` always.
    """

    ports: dict[str, tuple[Tensor, Tensor]]
    weight_grads: dict[str, Tensor]
    digital_grads: dict[str, Tensor]
    adjoint: Tensor | None
    free: RelaxResult | None
    loss: float
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, Tensor]:
        """Flattened gradient per comparison group: each projection, embeddings, layernorm, ..."""
        out: dict[str, list[Tensor]] = {}
        for name, g in self.weight_grads.items():
            out.setdefault(name, []).append(g.reshape(-1))
        for name in sorted(self.digital_grads):
            out.setdefault(EquilibriumTransformer.param_group(name), []).append(self.digital_grads[name].reshape(-1))
        return {k: torch.cat(v) for k, v in out.items()}


class GradientEstimator(Protocol):
    """What a training path holds to turn a batch into a gradient (Scellier's pattern): EP
    (`EPEstimator`), the implicit reference (`references.ImplicitReference`) and BPTT
    (`references.BPTTReference`) all compute a `GradientResult` whose `ports` carry the update in
    port form (u, δ), so any of them trains a path through `Projection.apply_update`.

    `phases` is the number K of stacked nudged phases whose reads a common-random-numbers wrapper
    splits into blocks of the batch (1 where the estimator has no nudged phases)."""

    phases: int

    def compute(
        self, model: EquilibriumTransformer, idx: Tensor, targets: Tensor, *, free: RelaxResult | None = None
    ) -> GradientResult: ...


def compare_gradients(est: GradientResult | dict[str, Tensor], ref: GradientResult | dict[str, Tensor]) -> dict[str, tuple[float, float]]:
    """{group: (cosine, ‖est‖/‖ref‖)} over the groups both sides have, plus "all" (concatenated)."""
    a = est.groups() if isinstance(est, GradientResult) else est
    b = ref.groups() if isinstance(ref, GradientResult) else ref
    out = {}
    flat_a, flat_b = [], []
    for name in a:
        if name not in b:
            continue
        x, y = a[name].reshape(-1).double(), b[name].reshape(-1).double()
        flat_a.append(x)
        flat_b.append(y)
        out[name] = _cos_ratio(x, y)
    if flat_a:
        out["all"] = _cos_ratio(torch.cat(flat_a), torch.cat(flat_b))
    return out


def _cos_ratio(x: Tensor, y: Tensor) -> tuple[float, float]:
    nx, ny = float(x.norm()), float(y.norm())
    cos = float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else float("nan")
    return cos, (nx / ny if ny > 0 else float("nan"))


# --------------------------------------------------------------------------- shared pieces
def free_phase(
    model: EquilibriumTransformer, idx: Tensor, solver: SolverConfig, stop: StopRule | None = None
) -> tuple[Tensor, RelaxResult]:
    """x_in and the free-phase relaxation from z = x_in (`relax` with the solver and stop rule):
    the one place a free phase is run, by estimators, references and training paths alike."""
    x_in = model.embed(idx)
    with torch.no_grad():
        result = relax(lambda z: model.force(z, x_in), x_in, solver, stop=stop)
    return x_in, result


def port_quantities(
    model: EquilibriumTransformer, z: Tensor, idx: Tensor, cotangent: Tensor
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """One vjp of ⟨cotangent, F(z)⟩: per block projection (u, δ), and digital-parameter gradients.

    z is treated as a constant (detached); the embeddings enter through the clamp x_in. W_h is not
    read inside F and so is absent here.
    """
    model.check_state(z, "z", finite=True)
    if cotangent.shape != z.shape:
        raise ValueError(f"cotangent has shape {tuple(cotangent.shape)}, expected {tuple(z.shape)}")
    if not all_finite(cotangent):
        raise FloatingPointError("the cotangent (adjoint) contains NaN or inf")
    params = {n: t.detach().requires_grad_(True) for n, t in model.params.items()}
    recorder = PortRecorder()
    with torch.enable_grad():
        x_in = model.embed(idx, params)
        f = model.force(z.detach(), x_in, params=params, recorder=recorder)
        grads = torch.autograd.grad(f, list(params.values()), cotangent.to(f.dtype), allow_unused=True)
    digital = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(params, grads)}
    ports = recorder.ports()
    expected = {"W_Q", "W_K", "W_V", "W_O", "W_1", "W_2"}
    if set(ports) != expected:
        raise RuntimeError(f"port capture missed projections {sorted(expected - set(ports))}")
    return ports, digital


def _readout_port(model: EquilibriumTransformer, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return z.detach(), model.readout_error(z, targets)


def _result_from_adjoint(
    model: EquilibriumTransformer,
    z_star: Tensor,
    idx: Tensor,
    targets: Tensor,
    adjoint: Tensor,
    free: RelaxResult | None,
    diagnostics: dict[str, Any],
) -> GradientResult:
    ports, digital = port_quantities(model, z_star, idx, adjoint)
    ports["W_h"] = _readout_port(model, z_star, targets)
    with torch.no_grad():
        loss = float(model.loss(z_star, targets))
    weight_grads = {n: outer_product_sum(u, d) for n, (u, d) in ports.items()}
    return GradientResult(ports, weight_grads, digital, adjoint, free, loss, diagnostics)


# --------------------------------------------------------------------------- Jacobian products
class _Counter:
    def __init__(self) -> None:
        self.force = 0.0  # force evaluations, in units of one F on the original batch
        self.jvp = 0.0
        self.vjp = 0.0


def _antisym_dual(model: EquilibriumTransformer, x_in: Tensor, p: Tensor, tangents: Tensor) -> Tensor:
    """(J(p) − J(p)ᵀ) v for real p, v of one shape: J v by dual numbers, Jᵀ v by a backward pass.

    The dual forward runs without building a graph, and Jᵀ v through a fresh plain graph: cheaper
    than back-propagating through the dual computation.
    """
    with torch.no_grad(), fwAD.dual_level():
        jv = fwAD.unpack_dual(model.force(fwAD.make_dual(p.detach(), tangents), x_in)).tangent
    point = p.detach().requires_grad_(True)
    with torch.enable_grad():
        (jtv,) = torch.autograd.grad(model.force(point, x_in), point, tangents)
    return jv - jtv


def _antisym_secant(model: EquilibriumTransformer, x_in: Tensor, p: Tensor, tangents: Tensor, jv: Tensor) -> Tensor:
    """(J(p) − J(p)ᵀ) v with J(p) v already known (a secant of nudged forces): Jᵀ v by a backward pass."""
    point = p.detach().requires_grad_(True)
    with torch.enable_grad():
        (jtv,) = torch.autograd.grad(model.force(point, x_in), point, tangents)
    return jv - jtv


class _FrozenLinearisation:
    """J(z*) and J(z*)ᵀ products for a fixed batch of M tangents: the Jᵀ graph is built once."""

    def __init__(self, model: EquilibriumTransformer, x_in: Tensor, z_star: Tensor):
        self.model = model
        self.x_in = x_in
        self.point = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            self.out = model.force(self.point, x_in)

    def antisym(self, tangents: Tensor) -> Tensor:
        (jtv,) = torch.autograd.grad(self.out, self.point, tangents, retain_graph=True)
        with torch.no_grad(), fwAD.dual_level():
            jv = fwAD.unpack_dual(self.model.force(fwAD.make_dual(self.point.detach(), tangents), self.x_in)).tangent
        return jv - jtv


# --------------------------------------------------------------------------- the EP estimator
class EPEstimator:
    """The EP estimator of SCIENCE §3 (see the module docstring for the variants)."""

    def __init__(self, cfg: EstimatorConfig | None = None, solver: SolverConfig | None = None):
        self.cfg = cfg or EstimatorConfig()
        self.solver = solver or SolverConfig(min_steps=150, tol=1e-4, max_steps=300)

    @property
    def phases(self) -> int:
        """K, the nudged phases run in lockstep as one stacked batch of K·B states."""
        return len(nudge_betas(self.cfg)[0])

    def compute(
        self,
        model: EquilibriumTransformer,
        idx: Tensor,
        targets: Tensor,
        *,
        free: RelaxResult | None = None,
    ) -> GradientResult:
        """Estimate the gradient; `free` reuses a free phase already run from x_in = model.embed(idx)."""
        model._check_targets(model.embed(idx), targets)
        t0 = time.perf_counter()
        if free is None:
            x_in, free = free_phase(model, idx, self.solver)
        else:
            x_in = model.embed(idx)
        t_free = time.perf_counter() - t0
        z_star = free.z.detach()
        model.check_state(z_star, "free-phase state z*", finite=True)
        if z_star.shape != x_in.shape:
            raise ValueError(f"free-phase state has shape {tuple(z_star.shape)}, expected {tuple(x_in.shape)}")
        adjoint, diag = self._nudge(model, x_in, z_star, targets)
        t_nudge = time.perf_counter() - t0 - t_free
        result = _result_from_adjoint(model, z_star, idx, targets, adjoint, free, diag)
        diag.update(
            free_residual=free.residual_max,
            free_converged=free.converged,
            free_force_evals=free.n_force_evals,
            seconds_free=t_free,
            seconds_nudge=t_nudge,
            seconds_ports=time.perf_counter() - t0 - t_free - t_nudge,
        )
        return result

    def _nudge(self, model: EquilibriumTransformer, x_in: Tensor, z_star: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Any]]:
        cfg, eps = self.cfg, self.solver.eps
        betas, weights = nudge_betas(cfg)
        K = len(betas)
        B = z_star.shape[0]
        n_tok = targets.numel()
        holo_complex = any(isinstance(b, complex) and b.imag != 0 for b in betas)
        dtype = z_star.dtype
        state_dtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype] if holo_complex else dtype

        def per_state(values: list[complex]) -> Tensor:
            t = torch.tensor(values, dtype=state_dtype if holo_complex else dtype, device=z_star.device)
            return t.repeat_interleave(B).view(K * B, 1, 1)

        beta_vec = per_state(betas)
        weight_vec = per_state(weights)
        x_rep = x_in.repeat(K, 1, 1)
        t_rep = targets.repeat(K, 1)
        z_star_rep = z_star.repeat(K, 1, 1)
        Z = z_star_rep.to(state_dtype).clone()
        count = _Counter()

        frozen = None
        if cfg.correction == "frozen":
            # Tangents: Re and Im parts of every v_k when complex, else the K real v_k.
            n_tan = 2 if holo_complex else 1
            frozen = _FrozenLinearisation(model, x_in.repeat(K * n_tan, 1, 1), z_star.repeat(K * n_tan, 1, 1))
            count.force += K * n_tan

        secant = cfg.correction == "tracking" and cfg.jvp == "secant"
        force_star = None
        if secant and K == 1:
            with torch.no_grad():
                force_star = model.force(z_star, x_in)
            count.force += 1

        def correction(Z: Tensor, force_Z: Tensor) -> Tensor:
            if cfg.correction == "none":
                return torch.zeros_like(Z)
            if cfg.correction == "frozen":
                V = Z - z_star_rep
                if holo_complex:
                    c = frozen.antisym(torch.cat([V.real, V.imag]))
                    count.jvp += 2 * K
                    count.vjp += 2 * K
                    return torch.complex(c[: K * B], c[K * B:])
                count.jvp += K
                count.vjp += K
                return frozen.antisym(V)
            # tracking
            Zk = Z.view(K, B, *Z.shape[1:])
            if K == 1:
                p = 0.5 * (z_star + Zk[0])
                V = Zk[0] - z_star
                count.vjp += 1
                if secant:
                    return _antisym_secant(model, x_in, p, V, force_Z - force_star)
                count.jvp += 1
                return _antisym_dual(model, x_in, p, V)
            p = Zk.mean(dim=0).real if holo_complex else Zk.mean(dim=0)
            if not holo_complex and K == 2:
                count.vjp += 1
                if secant:
                    c = _antisym_secant(model, x_in, p, Zk[0] - p, 0.5 * (force_Z[:B] - force_Z[B:]))
                else:
                    count.jvp += 1
                    c = _antisym_dual(model, x_in, p, Zk[0] - p)
                return torch.cat([c, -c])
            V = (Zk - p).reshape(K * B, *Z.shape[1:])
            p_rep = p.repeat(K, 1, 1)
            if holo_complex:
                c = _antisym_dual(model, x_in.repeat(2 * K, 1, 1), p_rep.repeat(2, 1, 1), torch.cat([V.real, V.imag]))
                count.jvp += 2 * K
                count.vjp += 2 * K
                return torch.complex(c[: K * B], c[K * B:])
            count.jvp += K
            count.vjp += K
            return _antisym_dual(model, x_in.repeat(K, 1, 1), p_rep, V)

        def adjoint_of(Z: Tensor) -> Tensor:
            a = -(weight_vec * (Z - z_star_rep)).view(K, B, *Z.shape[1:]).sum(dim=0)
            return a.real if a.is_complex() else a

        select = cfg.t2sel > cfg.t2
        best_a, best_inc, best_step, prev_a = None, math.inf, cfg.t2, None
        inc_trace: list[tuple[int, float]] = []
        with torch.no_grad():
            for step in range(1, cfg.n_steps + 1):
                force_Z = model.force(Z, x_rep)
                f = force_Z - beta_vec * model.loss_grad(Z, t_rep, n_tokens=n_tok)
                count.force += K
                if cfg.correction != "none":
                    f = f - correction(Z, force_Z)
                if step == cfg.n_steps:
                    nudge_res = one_step_residual(Z, f, eps)
                Z = Z + eps * f
                if not all_finite(Z):
                    raise FloatingPointError(f"nudged state became NaN/inf at nudge step {step}")
                if select and step % cfg.snapshot_every == 0 and step >= cfg.t2 - cfg.snapshot_every:
                    a = adjoint_of(Z)
                    if prev_a is not None and step >= cfg.t2:
                        inc = float((a - prev_a).norm())
                        inc_trace.append((step, inc))
                        if inc < best_inc:
                            best_a, best_inc, best_step = a, inc, step
                    prev_a = a
                if not select and step == cfg.t2:
                    best_a = adjoint_of(Z)
            if best_a is None:  # selection with no candidate (t2sel not reaching a snapshot)
                best_a, best_step = adjoint_of(Z), cfg.n_steps
        a_norm = float(best_a.norm())
        diag = {
            "nudge_steps": cfg.n_steps,
            "t2_selected": best_step,
            "adjoint_increment": (best_inc / a_norm) if (select and math.isfinite(best_inc) and a_norm > 0) else float("nan"),
            "increment_trace": inc_trace,
            "nudge_residual_max": float(nudge_res.max()),
            "force_evals_nudge": count.force,
            "jvp_evals": count.jvp,
            "vjp_evals": count.vjp,
            "jvp_method": cfg.jvp if cfg.correction == "tracking" else "n/a",
        }
        return best_a.detach(), diag


# --------------------------------------------------------------------------- resreg
@dataclass
class ResregResult:
    """The resreg penalty and its θ-gradient (z detached) in port form."""

    penalty: float
    ports: dict[str, tuple[Tensor, Tensor]]
    weight_grads: dict[str, Tensor]
    digital_grads: dict[str, Tensor]


def resreg_gradient(model: EquilibriumTransformer, z: Tensor, idx: Tensor, eps: float, delta: float = 1e-8,
                    force: Tensor | None = None) -> ResregResult:
    """Penalty mean_b ‖εF(z_b)‖²/(‖z_b‖² + δ) (SCIENCE §4) and its gradient in θ with z detached.

    d/dθ of the penalty is d/dθ ⟨c, F(z; θ)⟩ with c = 2ε² F(z)/((‖z_b‖² + δ) B), so its update
    has the same port form δ uᵀ as the EP update (W_h does not enter: no readout port).
    `force`: F(z) as already measured (e.g. the free phase's window-averaged force,
    `RelaxResult.force_mean`) instead of one evaluation of the model's force at z.
    """
    model.check_state(z, "z", finite=True)
    x_in = model.embed(idx)
    with torch.no_grad():
        f = model.force(z, x_in) if force is None else force.to(z.dtype)
        denom = z.reshape(z.shape[0], -1).pow(2).sum(dim=1) + delta
        per_sample = eps**2 * f.reshape(f.shape[0], -1).pow(2).sum(dim=1) / denom
        cot = (2 * eps**2 / z.shape[0]) * f / denom.view(-1, 1, 1)
    ports, digital = port_quantities(model, z, idx, cot)
    weight_grads = {n: outer_product_sum(u, d) for n, (u, d) in ports.items()}
    return ResregResult(float(per_sample.mean()), ports, weight_grads, digital)
