"""Stabilisers (SCIENCE §4) as objects that each return a port update, and the port accumulator.

A stabiliser sees one step's `StepContext` (the path's model, the batch, the free-phase state z,
the task update's norm, the read-out digital copy, the path's probe generator) and returns a
`PortUpdate`: per projection the port quantities (u, δ) whose Σ δuᵀ it adds to the step's update,
and gradients of the digital parameters. The path appends them to the task update in a
`PortUpdates` and hands everything to its optimiser sink in one `apply_update` per projection.
Adding a stabiliser = one class here with `port_update(ctx)` (+ its line in
`trainer.twin.build_stabilisers` and its test).

- `Resreg`: the gradient of ‖εF(z)‖²/(‖z‖² + δ) (`ept_hw.estimators.resreg_gradient`), scaled
  to `weight` times the task update's norm (`relative`) or by `weight`, pulsed like the task
  update. `source` says from what it is computed:
  - ``"readout"`` (default): exact weights at the free-phase state: the read-out digital copy on
    the analog path (a digital assist, like jacreg), the model itself on the twin, so both paths
    compute it the same way;
  - ``"arrays"`` (on-chip): the path's own reads at the window-mean state, with the free phase's
    window-averaged force (`RelaxResult.force_mean`: W reads averaged by the dynamics) as F.
    Measured at the demo's operating point it is not the exact-weight resreg (cosine below 0.9
    at every probe measured, −0.85 … 0.88; near the analog fixed point the exact-weight force is
    largely the periphery's systematic error, which no averaging of the chip's own reads sees),
    hence the default; the attribution factor `exact_stabilisers` measures what it costs.
  At health probes on the analog path it logs `resreg_cos` and `resreg_norm_ratio`: the on-chip
  estimate against the exact-weight one at the same state (projection weights only).
- `Jacreg` (digital assist on the analog path: on the read-out weights): λ·‖J_nc v‖²/‖v‖², J_nc v by
  a central difference of F along a Gaussian probe v; λ from the path's `JacregController`.
- `Eigreg` (digital assist on the analog path: on the read-out weights): the penalty on the leading
  eigenvalue of I + εJ at the worst sample (`ept_hw.stability.model_eigreg`), dense gradients in
  port form. Its subspace basis is warm-started from the previous step (state).
The validity gate (`trainer.controllers.ValidityGate`) decides whether the task update is
computed at all; the stabilisers apply on a gated step too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from ept_hw.estimators import port_quantities, resreg_gradient
from ept_hw.model import EquilibriumTransformer
from ept_hw.ops import outer_product_sum
from ept_hw.references import dense_ports
from ept_hw.stability import model_eigreg, model_force, worst_sample

from .controllers import JacregController

__all__ = ["StepContext", "PortUpdate", "PortUpdates", "Stabiliser", "Resreg", "Jacreg", "Eigreg", "update_norm",
           "RESREG_SOURCES", "resreg_agreement"]

Ports = dict[str, tuple[Tensor, Tensor]]


@dataclass
class StepContext:
    """What a stabiliser sees at one step."""

    model: EquilibriumTransformer  # the path's model (analog: reads through the arrays)
    readout: Callable[[], EquilibriumTransformer]  # the read-out digital copy (digital assists)
    idx: Tensor
    z: Tensor  # free-phase state (detached)
    eps: float
    task_norm: float | None  # norm of the latest task update (this step's unless gated)
    generator: torch.Generator  # the path's probe generator (jacreg's v, eigreg's start)
    force: Tensor | None = None  # the free phase's window-averaged force at z (WindowStop), if any
    analog: bool = False  # the path reads analog arrays
    health: bool = False  # a health-probe step (diagnostic figures are due)


@dataclass
class PortUpdate:
    """Ports and digital gradients of one contribution, the scale it enters with, its figures."""

    ports: Ports = field(default_factory=dict)
    digital: dict[str, Tensor] = field(default_factory=dict)
    scale: float = 1.0
    figures: dict[str, float | None] = field(default_factory=dict)


class Stabiliser(Protocol):
    name: str

    def port_update(self, ctx: StepContext) -> PortUpdate | None: ...


def update_norm(weight_grads: Mapping[str, Tensor], digital: Mapping[str, Tensor]) -> float:
    """‖(weight gradients, digital gradients)‖, all entries together."""
    total = sum(float(g.double().pow(2).sum()) for g in weight_grads.values())
    total += sum(float(g.double().pow(2).sum()) for g in digital.values())
    return math.sqrt(total)


class PortUpdates:
    """Per-projection lists of (u, δ) to apply in one `apply_update`, and digital gradients.

    The task's ports (`add(..., task=True)`, the EP estimate) come first in `merged`, and
    `task_rows` counts their rows: an analog tile's transfer schedule (aihwkit's `transfer_every`,
    in input vectors) counts the task's tokens, not the stabilisers' rows appended after them."""

    def __init__(self) -> None:
        self.ports: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.digital: dict[str, Tensor] = {}
        self._task_rows: dict[str, int] = {}

    def add(self, ports: Mapping[str, tuple[Tensor, Tensor]], digital: Mapping[str, Tensor], scale: float = 1.0,
            *, task: bool = False) -> None:
        for name, (u, d) in ports.items():
            entry = (u, d if scale == 1.0 else d * scale)
            pairs = self.ports.setdefault(name, [])
            if task:
                rows = u.reshape(-1, u.shape[-1]).shape[0]
                pairs.insert(self._n_task_entries(name), entry)
                self._task_rows[name] = self._task_rows.get(name, 0) + rows
            else:
                pairs.append(entry)
        for name, g in digital.items():
            g = g if scale == 1.0 else g * scale
            self.digital[name] = g if name not in self.digital else self.digital[name] + g

    def _n_task_entries(self, name: str) -> int:
        n, rows = 0, self._task_rows.get(name, 0)
        for u, _ in self.ports.get(name, []):
            if rows <= 0:
                break
            rows -= u.reshape(-1, u.shape[-1]).shape[0]
            n += 1
        return n

    def task_rows(self, name: str) -> int:
        """How many leading rows of `merged(name)` are the task's (0 on a gated step)."""
        return self._task_rows.get(name, 0)

    def merged(self, name: str) -> tuple[Tensor, Tensor]:
        pairs = self.ports[name]
        us = [u.reshape(-1, u.shape[-1]) for u, _ in pairs]
        ds = [d.reshape(-1, d.shape[-1]) for _, d in pairs]
        return torch.cat(us), torch.cat(ds)

    def dense(self, name: str) -> Tensor:
        u, d = self.merged(name)
        return outer_product_sum(u, d)


RESREG_SOURCES = ("readout", "arrays")


class Resreg:
    name = "resreg"

    def __init__(self, weight: float, relative: bool = True, delta: float = 1e-8, source: str = "readout"):
        if source not in RESREG_SOURCES:
            raise ValueError(f"resreg source must be one of {RESREG_SOURCES}, got {source!r}")
        self.weight, self.relative, self.delta, self.source = weight, relative, delta, source

    def estimate(self, ctx: StepContext, source: str) -> Any:
        """`ResregResult` from exact weights ("readout") or from the path's reads with the
        window-averaged force ("arrays"; one force read at z when the free phase has none)."""
        if source == "readout":
            return resreg_gradient(ctx.readout(), ctx.z, ctx.idx, ctx.eps, self.delta)
        return resreg_gradient(ctx.model, ctx.z, ctx.idx, ctx.eps, self.delta, force=ctx.force)

    def port_update(self, ctx: StepContext) -> PortUpdate | None:
        rr = self.estimate(ctx, self.source)
        figures: dict[str, float | None] = {}
        if ctx.health and ctx.analog:
            chip = rr if self.source == "arrays" else self.estimate(ctx, "arrays")
            exact = rr if self.source == "readout" else self.estimate(ctx, "readout")
            figures = resreg_agreement(chip.weight_grads, exact.weight_grads)
        scale = self.weight
        if self.relative:
            res_norm = update_norm(rr.weight_grads, rr.digital_grads)
            scale = self.weight * ctx.task_norm / res_norm if (ctx.task_norm and res_norm > 0) else 0.0
        if scale <= 0:
            return PortUpdate(figures=figures) if figures else None
        return PortUpdate(rr.ports, rr.digital_grads, scale, figures=figures)


def resreg_agreement(chip: Mapping[str, Tensor], exact: Mapping[str, Tensor]) -> dict[str, float]:
    """{"resreg_cos", "resreg_norm_ratio"}: the on-chip resreg's projection gradients against the
    exact-weight ones, all projections as one vector."""
    names = sorted(exact)
    a = torch.cat([chip[n].reshape(-1).double() for n in names])
    b = torch.cat([exact[n].reshape(-1).double() for n in names])
    na, nb = float(a.norm()), float(b.norm())
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return {"resreg_cos": cos, "resreg_norm_ratio": na / nb if nb > 0 else math.nan}


class Jacreg:
    name = "jacreg"

    def __init__(self, controller: JacregController, fd_step: float, damping: float):
        self.controller, self.fd_step, self.damping = controller, fd_step, damping

    def port_update(self, ctx: StepContext) -> PortUpdate | None:
        lam = self.controller.lam
        if lam <= 0:
            return None
        ports, digital = self.ports(ctx, lam)
        return PortUpdate(ports, digital)

    def ports(self, ctx: StepContext, lam: float) -> tuple[Ports, dict[str, Tensor]]:
        """Ports of λ·‖J_nc v‖²/‖v‖² (central difference of F), on the read-out copy."""
        model, z, idx = ctx.readout(), ctx.z, ctx.idx
        v = torch.randn(z.shape, generator=ctx.generator, dtype=z.dtype, device=ctx.generator.device).to(z.device)
        v_norm2 = float(v.pow(2).sum())
        h = self.fd_step * float(z.norm()) / math.sqrt(v_norm2)
        x_in = model.embed(idx)
        with torch.no_grad():
            jv = (model.force(z + h * v, x_in) - model.force(z - h * v, x_in)) / (2 * h)
            jnc_v = jv + (1.0 + self.damping) * v
            cot = (lam / (h * v_norm2)) * jnc_v
        ports_p, dig_p = port_quantities(model, z + h * v, idx, cot)
        ports_m, dig_m = port_quantities(model, z - h * v, idx, -cot)
        ports = {n: (torch.cat([ports_p[n][0], ports_m[n][0]]), torch.cat([ports_p[n][1], ports_m[n][1]])) for n in ports_p}
        digital = {n: dig_p[n] + dig_m[n] for n in dig_p}
        return ports, digital


class Eigreg:
    name = "eigreg"

    def __init__(self, cfg: Any):
        self.cfg = cfg  # ept_hw.stability.EigRegConfig
        self.basis: Tensor | None = None  # warm start of the subspace iteration

    def port_update(self, ctx: StepContext) -> PortUpdate:
        """Ports (u = identity rows, δ = gradient columns) and digital gradients of eigreg at the
        worst sample of the batch (largest one-step residual), on the read-out copy."""
        model, z = ctx.readout(), ctx.z
        with torch.no_grad():
            x_in = model.embed(ctx.idx)
        b, _ = worst_sample(model_force(model, x_in), z, ctx.eps)
        params = {n: t.detach().clone().requires_grad_(True) for n, t in model.params.items()}
        result, weight_grads, param_grads = model_eigreg(
            model, z[b : b + 1], x_in[b : b + 1], self.cfg, eps=ctx.eps, params=params, basis=self.basis,
            generator=ctx.generator,
        )
        self.basis = result.basis.detach().clone()
        penalty = float(result.penalty.detach())
        figures = {"eigreg_penalty": penalty, "eigreg_abs_lambda": result.lead_abs_lambda}
        if penalty <= 0:
            return PortUpdate(figures=figures)
        ports = dense_ports({n: g for n, g in weight_grads.items() if float(g.abs().max()) > 0})
        digital = {n: g.detach() for n, g in param_grads.items() if float(g.abs().max()) > 0}
        return PortUpdate(ports, digital, figures=figures)
