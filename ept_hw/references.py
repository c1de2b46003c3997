"""Exact gradient references: the implicit-function-theorem gradient at z*, and BPTT.

Both return a `GradientResult` in the estimator's per-group layout, so a comparison is
`compare_gradients(estimate, reference)`.

- Implicit (IFT): at the fixed point F(z*; θ) = 0, dL/dθ = ∂/∂θ ⟨a*, F(z*; θ)⟩ (+ the direct
  readout gradient for W_h) with the adjoint a* solving J(z*)ᵀ a* = −∇_z ℓ(z*). The adjoint is
  solved matrix-free by scipy's GMRES on a LinearOperator whose matvec is one backward pass through
  a graph of F built once at z* (Jᵀ v, through the projections' transposed reads).
- BPTT: the Euler free phase z_{t+1} = z_t + ε F(z_t) from z_0 = x_in unrolled for a fixed number
  of steps with autograd, loss at the last state, one backward. Every projection read of every step
  is recorded, and its weight gradient is Σ_t δ_t u_tᵀ.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse.linalg as spla
import torch
from torch import Tensor

from .estimators import GradientResult, _result_from_adjoint, free_phase
from .model import EquilibriumTransformer
from .ops import PortRecorder
from .relaxation import RelaxResult, SolverConfig

__all__ = ["ImplicitReference", "BPTTReference", "implicit_gradient", "bptt_gradient", "solve_adjoint", "dense_ports"]


def solve_adjoint(
    model: EquilibriumTransformer, x_in: Tensor, z_star: Tensor, rhs: Tensor, *, rtol: float = 1e-12, maxiter: int = 500
) -> tuple[Tensor, dict]:
    """Solve J(z*)ᵀ a = rhs by GMRES (float64 in scipy); returns a and {'iterations', 'relative_residual'}."""
    point = z_star.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model.force(point, x_in)
    shape, dtype = z_star.shape, z_star.dtype
    n = z_star.numel()
    calls = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        calls[0] += 1
        vt = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(dtype).view(shape)
        (jtv,) = torch.autograd.grad(out, point, vt, retain_graph=True)
        return jtv.detach().to(torch.float64).reshape(-1).numpy()

    op = spla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    b = rhs.detach().to(torch.float64).reshape(-1).numpy()
    # J ≈ −(1 + c) I + (block): start from the diagonal guess.
    x0 = -b / (1.0 + model.cfg.damping)
    sol, info = spla.gmres(op, b, x0=x0, rtol=rtol, atol=0.0, restart=min(n, 60), maxiter=maxiter)
    a = torch.from_numpy(sol).to(dtype).view(shape)
    resid = float(np.linalg.norm(matvec(sol) - b) / max(np.linalg.norm(b), 1e-300))
    if info < 0:
        raise RuntimeError(f"GMRES failed (info = {info})")
    return a, {"iterations": calls[0], "relative_residual": resid, "gmres_info": int(info)}


def implicit_gradient(
    model: EquilibriumTransformer,
    idx: Tensor,
    targets: Tensor,
    solver: SolverConfig,
    *,
    free: RelaxResult | None = None,
    rtol: float = 1e-12,
) -> GradientResult:
    """The IFT gradient at the free phase's z* (relaxed with `solver` unless `free` is given)."""
    x_in = model.embed(idx)
    model._check_targets(x_in, targets)
    t0 = time.perf_counter()
    if free is None:
        x_in, free = free_phase(model, idx, solver)
    z_star = free.z.detach()
    model.check_state(z_star, "free-phase state z*", finite=True)
    with torch.no_grad():
        rhs = -model.loss_grad(z_star, targets)
    adjoint, info = solve_adjoint(model, x_in, z_star, rhs, rtol=rtol)
    info["seconds"] = time.perf_counter() - t0
    info["free_residual"] = free.residual_max
    return _result_from_adjoint(model, z_star, idx, targets, adjoint, free, info)


def bptt_gradient(model: EquilibriumTransformer, idx: Tensor, targets: Tensor, steps: int, eps: float) -> GradientResult:
    """Backprop through `steps` unrolled Euler steps of the free phase from x_in (loss at the end)."""
    if steps < 1:
        raise ValueError(f"BPTT needs at least one step, got {steps}")
    params = {n: t.detach().requires_grad_(True) for n, t in model.params.items()}
    recorder = PortRecorder()
    with torch.enable_grad():
        x_in = model.embed(idx, params)
        model._check_targets(x_in, targets)
        z = x_in
        for _ in range(steps):
            z = z + eps * model.force(z, x_in, params=params, recorder=recorder)
        model.check_state(z, "unrolled state", finite=True)
        loss = torch.nn.functional.cross_entropy(
            model.logits(z, recorder=recorder).reshape(-1, model.cfg.vocab_size), targets.reshape(-1).long()
        )
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    digital = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(params, grads)}
    with torch.no_grad():
        f = model.force(z.detach(), x_in.detach())
        res = float((eps * f).flatten(1).norm(dim=1).div(z.detach().flatten(1).norm(dim=1)).max())
    return GradientResult(
        ports={},
        weight_grads=recorder.weight_grads(),
        digital_grads=digital,
        adjoint=None,
        free=None,
        loss=float(loss.detach()),
        diagnostics={"steps": steps, "final_residual": res},
    )


def dense_ports(weight_grads: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Port form of dense weight gradients G: u = identity rows, δ = columns of G, so that
    Σ δ uᵀ = G goes through the same `Projection.apply_update` as an EP update."""
    return {name: (torch.eye(g.shape[1], dtype=g.dtype), g.T.contiguous()) for name, g in weight_grads.items()}


class ImplicitReference:
    """`GradientEstimator` face of `implicit_gradient` (ports: the single read at z*)."""

    phases = 1

    def __init__(self, solver: SolverConfig, rtol: float = 1e-12):
        self.solver, self.rtol = solver, rtol

    def compute(self, model: EquilibriumTransformer, idx: Tensor, targets: Tensor, *, free: RelaxResult | None = None) -> GradientResult:
        return implicit_gradient(model, idx, targets, self.solver, free=free, rtol=self.rtol)


class BPTTReference:
    """`GradientEstimator` face of `bptt_gradient`: the dense weight gradients in port form
    (`dense_ports`). It unrolls its own `steps` Euler steps from x_in; a free phase handed in is
    not used (the path's free phase only gives the loss and residual figures)."""

    phases = 1

    def __init__(self, steps: int, eps: float = 0.1):
        self.steps, self.eps = steps, eps

    def compute(self, model: EquilibriumTransformer, idx: Tensor, targets: Tensor, *, free: RelaxResult | None = None) -> GradientResult:
        res = bptt_gradient(model, idx, targets, self.steps, self.eps)
        res.ports = dense_ports(res.weight_grads)
        return res
