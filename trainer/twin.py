"""Training paths: one EP path (analog or digital twin), BPTT on the same block, a BP transformer.

The twin rule (issue 5): analog and twin start from the same weights, see the same batches, and
learn by the same rule: plain SGD on the projections' port updates,

    W ← W − lr·Σ_{batch, tokens} δ uᵀ        (`Projection.apply_update(u, δ, lr)`)

with δ the output-side error of the mean-over-tokens cross-entropy, the same learning-rate
schedule, the same integrator (Euler, ε of the solver) and estimator settings. On the digital
twin the update is exact; on the analog path `AnalogProjection.apply_update` turns lr·δuᵀ into
pulse trains (aihwkit semantics: lr·|δ|·|u| in units of the device's dw_min sets the expected
number of coincident pulses per device, capped by the pulse-train length BL; see `crossbar`), so
one unit of lr means the same requested weight change on both paths and any difference is the
devices' response. The digital periphery (embeddings, LayerNorm, biases, qknorm gains) is updated
by the path's optimiser (SGD with lr·`periphery_lr_scale` in the twin rule).

Stabilisers on every EP step (SCIENCE §4; defaults resreg 0.2, jacreg frozen 0.1, gate off):
- resreg (on-chip): port form δuᵀ from `ept_hw.estimators.resreg_gradient`, computed through the
  path's own reads, appended to the EP ports and applied by the same pulses;
- jacreg (digital assist on the analog path): computed on a digital copy programmed from the
  arrays' read-out weights (`proj.weight`), then applied to the arrays through the pulses;
- eigreg (digital assist on the analog path, like jacreg: on the read-out weights): the penalty
  on the leading eigenvalue of I + εJ (`ept_hw.stability.model_eigreg`) at the worst sample's
  free-phase state; its dense weight gradient goes through `apply_update` in port form;
- gate: when the noise-aware residual is above the level the nudge is skipped; resreg and jacreg
  still apply.

Each path returns a `StepOutcome`; `trainer.loop` puts both paths on one metrics row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from ept_hw.estimators import EPEstimator, GradientResult, compare_gradients, nudge_betas, port_quantities, resreg_gradient
from ept_hw.model import PROJECTION_NAMES, EquilibriumTransformer
from ept_hw.ops import outer_product_sum
from ept_hw.projection import digital_factory
from ept_hw.references import bptt_gradient, implicit_gradient
from ept_hw.relaxation import SolverConfig, one_step_residual, relax

from .config import RunConfig
from .controllers import JacregController, ParameterEMA, ValidityGate
from .divergence import DivergenceMonitor
from .physics import FreePhase, noise_aware_free_phase

__all__ = ["StepOutcome", "EPPath", "BPTTPath", "BPPath", "analog_counters", "weight_gap"]


@dataclass
class StepOutcome:
    loss: float
    residual: float
    residual_raw: float | None = None
    residual_floor: float | None = None
    free_steps: int | None = None
    nudge_steps: int | None = None
    gated: bool = False
    jacreg_lambda: float | None = None
    updates: dict[str, Tensor] = field(default_factory=dict)  # applied ΔW request per projection (lr·Σδuᵀ)
    health: dict[str, float] = field(default_factory=dict)  # health_cos, health_norm_ratio, health_self_coherence
    adjoint_snr: float | None = None
    eigreg_penalty: float | None = None
    eigreg_abs_lambda: float | None = None

    @property
    def update_norm(self) -> float | None:
        if not self.updates:
            return None
        return math.sqrt(sum(float(u.double().pow(2).sum()) for u in self.updates.values()))


def analog_counters(model: EquilibriumTransformer) -> dict[str, float | None]:
    """Saturation fraction, pulses and ADC conversions summed over the projections that report
    them (`AnalogProjection.counters()`); None where no projection does (digital path)."""
    pulses = adc = 0.0
    sat_num = sat_den = 0.0
    seen = False
    for proj in model.projections.values():
        counters = getattr(proj, "counters", None)
        if counters is None:
            continue
        c = counters() if callable(counters) else counters
        seen = True
        n = float(proj.in_features * proj.out_features)
        pulses += float(c.get("pulses_mean", 0.0)) * n  # pulses per device (mean) x devices
        adc += float(c.get("adc_conversions", 0.0))
        sat_num += float(c.get("device_saturation_fraction", 0.0)) * n
        sat_den += n
    if not seen:
        return {"saturation": None, "pulses": None, "adc_conversions": None}
    return {"saturation": sat_num / sat_den if sat_den else None, "pulses": pulses, "adc_conversions": adc}


def weight_gap(a: EquilibriumTransformer, b: EquilibriumTransformer) -> tuple[float, dict[str, float]]:
    """‖W_a − W_b‖/‖W_b‖ over all projections, and per projection."""
    num = den = 0.0
    per: dict[str, float] = {}
    for name in PROJECTION_NAMES:
        wa = a.projections[name].weight.double()
        wb = b.projections[name].weight.double()
        d2, n2 = float((wa - wb).pow(2).sum()), float(wb.pow(2).sum())
        per[name] = math.sqrt(d2 / n2) if n2 > 0 else math.nan
        num += d2
        den += n2
    return (math.sqrt(num / den) if den > 0 else math.nan), per


def _cos(x: Tensor, y: Tensor) -> float:
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    nx, ny = float(x.norm()), float(y.norm())
    return float(x @ y) / (nx * ny) if nx > 0 and ny > 0 else math.nan


class _Ports:
    """Per-projection lists of (u, δ) to apply in one `apply_update`, and digital gradients."""

    def __init__(self) -> None:
        self.ports: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.digital: dict[str, Tensor] = {}

    def add(self, ports: Mapping[str, tuple[Tensor, Tensor]], digital: Mapping[str, Tensor], scale: float = 1.0) -> None:
        for name, (u, d) in ports.items():
            self.ports.setdefault(name, []).append((u, d if scale == 1.0 else d * scale))
        for name, g in digital.items():
            g = g if scale == 1.0 else g * scale
            self.digital[name] = g if name not in self.digital else self.digital[name] + g

    def merged(self, name: str) -> tuple[Tensor, Tensor]:
        pairs = self.ports[name]
        us = [u.reshape(-1, u.shape[-1]) for u, _ in pairs]
        ds = [d.reshape(-1, d.shape[-1]) for _, d in pairs]
        return torch.cat(us), torch.cat(ds)

    def dense(self, name: str) -> Tensor:
        u, d = self.merged(name)
        return outer_product_sum(u, d)


def _norm_of(weight_grads: Mapping[str, Tensor], digital: Mapping[str, Tensor]) -> float:
    total = sum(float(g.double().pow(2).sum()) for g in weight_grads.values())
    total += sum(float(g.double().pow(2).sum()) for g in digital.values())
    return math.sqrt(total)


class EPPath:
    """One EP-trained equilibrium transformer (the analog path or the digital twin)."""

    def __init__(
        self,
        name: str,
        model: EquilibriumTransformer,
        cfg: RunConfig,
        *,
        analog: bool,
        probe_seed: int,
        extra_generators: Mapping[str, torch.Generator] | None = None,
    ):
        self.name = name
        self.model = model
        self.cfg = cfg
        self.analog = analog
        self.estimator = EPEstimator(cfg.estimator, cfg.solver)
        st = cfg.stabilisers
        self.controller = JacregController(st.jacreg)
        self.gate = ValidityGate(st.gate, st.gate_level)
        self.monitor = DivergenceMonitor(cfg.divergence, cfg.model.vocab_size, name, model.dtype)
        self.probe_generator = torch.Generator().manual_seed(probe_seed)
        # Generators owned by the analog arrays (read noise, pulse sampling): checkpointed here so
        # that a resumed run draws exactly what the uninterrupted one would.
        self.extra_generators = dict(extra_generators or {})
        self.last_task_norm: float | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: ParameterEMA | None = None
        self._shadow: EquilibriumTransformer | None = None
        self.eigreg_basis: Tensor | None = None  # warm start of eigreg's subspace iteration
        if cfg.training.optimizer == "adamw":
            self._build_adamw()
        if cfg.training.ema > 0:
            self.ema = ParameterEMA(cfg.training.ema, self._all_tensors())

    # ------------------------------------------------------------------ parameters
    def _all_tensors(self) -> dict[str, Tensor]:
        tensors = {f"proj.{n}": p.parameter for n, p in self.model.projections.items() if hasattr(p, "parameter")}
        tensors.update({f"param.{n}": t for n, t in self.model.params.items()})
        return tensors

    def _build_adamw(self) -> None:
        t = self.cfg.training
        if any(not hasattr(p, "parameter") for p in self.model.projections.values()):
            raise ValueError("AdamW needs digital projections (a gradient tensor per weight)")
        self.optimizer = torch.optim.AdamW(
            list(self._all_tensors().values()), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay
        )

    def _shadow_model(self) -> EquilibriumTransformer:
        """Digital copy programmed from the arrays' read-out weights (jacreg's digital assist)."""
        if not self.analog:
            return self.model
        if self._shadow is None:
            gen = torch.Generator().manual_seed(0)
            self._shadow = EquilibriumTransformer(self.cfg.model, digital_factory, gen, dtype=self.model.dtype)
        for name, proj in self.model.projections.items():
            self._shadow.projections[name].program(proj.weight)
        self._shadow.params = self.model.params  # the periphery is digital: share it
        return self._shadow

    # ------------------------------------------------------------------ free phase
    def free_phase(self, idx: Tensor) -> tuple[Tensor, FreePhase]:
        x_in = self.model.embed(idx)
        solver = self.cfg.solver
        force = lambda z: self.model.force(z, x_in)  # noqa: E731
        if solver.method == "euler":
            a = self.cfg.analog
            fp = noise_aware_free_phase(force, x_in, solver, a.noise_window, a.stop_patience)
        else:  # digital-only solvers (Anderson, Dormand-Prince): no read noise, no floor
            with torch.no_grad():
                r = relax(force, x_in, solver)
            fp = FreePhase(r, r.residual_max, r.residual_max, 0.0, False, r.n_steps)
        return x_in, fp

    # ------------------------------------------------------------------ one step
    def _jacreg(self, idx: Tensor, z: Tensor, lam: float) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Ports of λ·‖J_nc v‖²/‖v‖² (central difference of F), on the shadow model."""
        model = self._shadow_model()
        v = torch.randn(z.shape, generator=self.probe_generator, dtype=z.dtype)
        v_norm2 = float(v.pow(2).sum())
        h = self.cfg.stabilisers.jacreg_fd_step * float(z.norm()) / math.sqrt(v_norm2)
        x_in = model.embed(idx)
        with torch.no_grad():
            jv = (model.force(z + h * v, x_in) - model.force(z - h * v, x_in)) / (2 * h)
            jnc_v = jv + (1.0 + self.cfg.model.damping) * v
            cot = (lam / (h * v_norm2)) * jnc_v
        ports_p, dig_p = port_quantities(model, z + h * v, idx, cot)
        ports_m, dig_m = port_quantities(model, z - h * v, idx, -cot)
        ports = {n: (torch.cat([ports_p[n][0], ports_m[n][0]]), torch.cat([ports_p[n][1], ports_m[n][1]])) for n in ports_p}
        digital = {n: dig_p[n] + dig_m[n] for n in dig_p}
        return ports, digital

    def _eigreg(self, idx: Tensor, z: Tensor, out: StepOutcome) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """Ports (u = identity rows, δ = gradient columns) and digital gradients of eigreg at the
        worst sample of the batch (largest one-step residual), on the shadow model."""
        from ept_hw.stability import EigRegConfig, model_eigreg

        st = self.cfg.stabilisers
        model = self._shadow_model()
        with torch.no_grad():
            x_in = model.embed(idx)
            res = one_step_residual(z, model.force(z, x_in), self.cfg.solver.eps)
        b = int(torch.argmax(res.reshape(res.shape[0], -1).amax(dim=1))) if res.dim() > 0 else 0
        cfg = EigRegConfig(weight=st.eigreg, margin=st.eigreg_margin, on=st.eigreg_on, eps=self.cfg.solver.eps,
                           iters=st.eigreg_iters, block=st.eigreg_block)
        params = {n: t.detach().clone().requires_grad_(True) for n, t in model.params.items()}
        result, weight_grads, param_grads = model_eigreg(
            model, z[b : b + 1], x_in[b : b + 1], cfg, params=params, basis=self.eigreg_basis,
            generator=self.probe_generator,
        )
        self.eigreg_basis = result.basis.detach().clone()
        out.eigreg_penalty = float(result.penalty.detach())
        out.eigreg_abs_lambda = result.lead_abs_lambda
        if out.eigreg_penalty <= 0:
            return {}, {}
        ports = {}
        for name, g in weight_grads.items():
            if float(g.abs().max()) > 0:
                ports[name] = (torch.eye(g.shape[1], dtype=g.dtype), g.T.contiguous())
        digital = {n: g.detach() for n, g in param_grads.items() if float(g.abs().max()) > 0}
        return ports, digital

    def stability(self, idx: Tensor) -> dict[str, Any]:
        """Leading Re μ, |Im μ| of J and |λ| of I + εJ at the operating point of the worst sequence
        of `idx` (by one-step residual), on the shadow model (the analog arrays' read-out weights:
        through noisy reads an eigenvalue would be the noise's). Small ARPACK settings (k =
        `training.stability_k`, tol `training.stability_tol`): a monitor, not a reference."""
        from ept_hw.stability import leading_eigenvalues

        t = self.cfg.training
        model = self._shadow_model()
        solver = self.cfg.solver
        with torch.no_grad():
            x_in = model.embed(idx)
            force = lambda z: model.force(z, x_in)  # noqa: E731
            r = relax(force, x_in, solver)
            res = one_step_residual(r.z, force(r.z), solver.eps)
        b = int(torch.argmax(res.reshape(res.shape[0], -1).amax(dim=1)))
        xb = x_in[b : b + 1]
        eig = leading_eigenvalues(lambda z: model.force(z, xb), r.z[b : b + 1], solver.eps, k=t.stability_k,
                                  tol=t.stability_tol, ncv=max(2 * t.stability_k + 14, 16), maxiter=500,
                                  generator=torch.Generator().manual_seed(self.cfg.seed + 11))
        return {"re_mu": eig.lead_re_mu, "im_mu": eig.lead_im_mu, "abs_lambda": eig.lead_abs_lambda,
                "converged": bool(r.converged), "residual": float(res[b].max()), "n_matvecs": eig.n_matvecs}

    def _task_gradient(self, idx: Tensor, targets: Tensor, fp: FreePhase) -> GradientResult:
        if not (self.analog and self.cfg.analog.noise_mode == "common"):
            return self.estimator.compute(self.model, idx, targets, free=fp.result)
        from .analog import set_common_blocks

        k = len(nudge_betas(self.cfg.estimator)[0])
        set_common_blocks(self.model.projections, (k, idx.shape[0]))
        try:
            return self.estimator.compute(self.model, idx, targets, free=fp.result)
        finally:
            set_common_blocks(self.model.projections, None)

    def train_step(self, idx: Tensor, targets: Tensor, lr: float, *, health: bool = False) -> StepOutcome:
        cfg, st = self.cfg, self.cfg.stabilisers
        x_in, fp = self.free_phase(idx)
        z = fp.result.z.detach()
        residual = fp.residual
        gated = not self.gate.is_open(residual)
        lam = self.controller.lam
        ports = _Ports()
        ep: GradientResult | None = None
        out = StepOutcome(
            loss=math.nan, residual=residual, residual_raw=fp.residual_raw, residual_floor=fp.floor,
            free_steps=fp.steps, gated=gated, jacreg_lambda=lam if st.jacreg_on else None,
        )
        if not gated:
            ep = self._task_gradient(idx, targets, fp)
            out.loss = ep.loss
            out.nudge_steps = ep.diagnostics.get("nudge_steps")
            ports.add(ep.ports, ep.digital_grads)
            self.last_task_norm = _norm_of(ep.weight_grads, ep.digital_grads)
            if health:
                self._probe(idx, targets, fp, ep, out)
        else:
            with torch.no_grad():
                out.loss = float(self.model.loss(z, targets))
        if st.resreg > 0:
            rr = resreg_gradient(self.model, z, idx, cfg.solver.eps, st.resreg_delta)
            scale = st.resreg
            if st.resreg_relative:
                res_norm = _norm_of(rr.weight_grads, rr.digital_grads)
                scale = st.resreg * self.last_task_norm / res_norm if (self.last_task_norm and res_norm > 0) else 0.0
            if scale > 0:
                ports.add(rr.ports, rr.digital_grads, scale)
        if st.jacreg_on and lam > 0:
            jp, jd = self._jacreg(idx, z, lam)
            ports.add(jp, jd)
        if st.eigreg > 0:
            ep_ports, ep_digital = self._eigreg(idx, z, out)
            ports.add(ep_ports, ep_digital)
        self._apply(ports, lr, out)
        self.controller.update(residual)
        return out

    def _apply(self, ports: _Ports, lr: float, out: StepOutcome) -> None:
        t = self.cfg.training
        grads = {name: ports.dense(name) for name in ports.ports}
        for name, g in grads.items():
            out.updates[name] = lr * g
        if self.optimizer is None:
            for name, proj in self.model.projections.items():
                if name in ports.ports:
                    u, d = ports.merged(name)
                    proj.apply_update(u, d, lr)
            plr = lr * t.periphery_lr_scale
            for name, g in ports.digital.items():
                if EquilibriumTransformer.param_group(name) in t.frozen:
                    continue
                self.model.params[name].sub_(plr * g.to(self.model.params[name].dtype))
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            tensors = self._all_tensors()
            for key, tensor in tensors.items():
                kind, name = key.split(".", 1)
                if kind == "proj":
                    tensor.grad = grads[name].to(tensor.dtype) if name in grads else None
                else:
                    g = ports.digital.get(name)
                    if g is None or EquilibriumTransformer.param_group(name) in t.frozen:
                        tensor.grad = None  # AdamW skips it (weight decay included)
                    else:
                        tensor.grad = g.to(tensor.dtype)
            self.optimizer.step()
            for tensor in tensors.values():
                tensor.grad = None
        if self.ema is not None:
            self.ema.update(self._all_tensors())

    def _probe(self, idx: Tensor, targets: Tensor, fp: FreePhase, ep: GradientResult, out: StepOutcome) -> None:
        """Estimator health (digital path) or adjoint SNR (analog path), before the update."""
        if self.analog:
            adjoints = [ep.adjoint]
            for _ in range(2):
                adjoints.append(self._task_gradient(idx, targets, fp).adjoint)
            a = torch.stack([x.double() for x in adjoints])
            mean = a.mean(dim=0)
            spread = math.sqrt(float((a - mean).pow(2).sum(dim=tuple(range(1, a.dim()))).mean()) * len(adjoints) / (len(adjoints) - 1))
            out.adjoint_snr = float(mean.norm()) / spread if spread > 0 else math.inf
            return
        ref = implicit_gradient(self.model, idx, targets, self.cfg.solver, free=fp.result, rtol=1e-6)
        cos, ratio = compare_gradients(ep, ref)["all"]
        half = idx.shape[0] // 2
        if half >= 1:
            halves = []
            for sl in (slice(0, half), slice(half, 2 * half)):
                _, fph = self.free_phase(idx[sl])
                halves.append(self.estimator.compute(self.model, idx[sl], targets[sl], free=fph.result))
            coherence = compare_gradients(halves[0], halves[1])["all"][0]
        else:
            coherence = math.nan
        out.health = {"health_cos": cos, "health_norm_ratio": ratio, "health_self_coherence": coherence}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        swap = self.ema is not None
        if swap:
            saved = {k: v.clone() for k, v in self._all_tensors().items()}
            for k, v in self._all_tensors().items():
                v.copy_(self.ema.shadow[k])
        try:
            total = 0.0
            for idx, targets in batches:
                _, fp = self.free_phase(idx)
                with torch.no_grad():
                    total += float(self.model.loss(fp.result.z, targets))
            return total / len(batches)
        finally:
            if swap:
                for k, v in self._all_tensors().items():
                    v.copy_(saved[k])

    @torch.no_grad()
    def next_token_logits(self, idx: Tensor) -> Tensor:
        _, fp = self.free_phase(idx)
        return self.model.logits(fp.result.z)[:, -1]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "controller": self.controller.state_dict(),
            "monitor": self.monitor.state_dict(),
            "probe_generator": self.probe_generator.get_state(),
            "extra_generators": {k: g.get_state() for k, g in self.extra_generators.items()},
            "last_task_norm": self.last_task_norm,
            "eigreg_basis": self.eigreg_basis,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:  # rebuild on the loaded tensors
            self._build_adamw()
        if self.ema is not None:
            self.ema = ParameterEMA(self.cfg.training.ema, self._all_tensors())
        if weights_only:
            return
        self.controller.load_state_dict(state["controller"])
        self.monitor.load_state_dict(state["monitor"])
        self.probe_generator.set_state(state["probe_generator"])
        for k, s in state["extra_generators"].items():
            if k in self.extra_generators:
                self.extra_generators[k].set_state(s)
        self.last_task_norm = state["last_task_norm"]
        self.eigreg_basis = state.get("eigreg_basis")
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    def weights(self) -> dict[str, Tensor]:
        return {n: p.weight.detach().clone() for n, p in self.model.projections.items()}


class BPTTPath(EPPath):
    """BPTT through `training.bptt_steps` unrolled Euler steps of the same block, same stabilisers
    (resreg at the unrolled state, jacreg, optimiser). Digital only."""

    def free_phase(self, idx: Tensor) -> tuple[Tensor, FreePhase]:
        if self.cfg.solver.method != "euler":
            return super().free_phase(idx)
        x_in = self.model.embed(idx)
        steps = self.cfg.training.bptt_steps
        solver = SolverConfig(method="euler", eps=self.cfg.solver.eps, tol=0.0, min_steps=steps, max_steps=steps)
        with torch.no_grad():
            r = relax(lambda z: self.model.force(z, x_in), x_in, solver)
        return x_in, FreePhase(r, r.residual_max, r.residual_max, 0.0, False, r.n_steps)

    def _task_gradient(self, idx: Tensor, targets: Tensor, fp: FreePhase) -> GradientResult:
        res = bptt_gradient(self.model, idx, targets, self.cfg.training.bptt_steps, self.cfg.solver.eps)
        # Port form of the dense BPTT weight gradient G: u = identity rows, δ = columns of G, so
        # that Σ δ uᵀ = G goes through the same `apply_update` as every other path.
        ports = {}
        for name, g in res.weight_grads.items():
            eye = torch.eye(g.shape[1], dtype=g.dtype)
            ports[name] = (eye, g.T.contiguous())
        res.ports = ports
        res.diagnostics["nudge_steps"] = None
        return res

    def _probe(self, *args: Any, **kwargs: Any) -> None:  # no EP estimator to probe
        return None


class BPPath:
    """A standard pre-LN transformer of matched width (same C, heads, FFN width, context, blocks = 1),
    trained by backprop with AdamW (or SGD): the non-equilibrium reference."""

    def __init__(self, cfg: RunConfig, generator: torch.Generator):
        from .bp_reference import BPTransformer

        self.name = "twin"
        self.cfg = cfg
        self.analog = False
        self.net = BPTransformer(cfg.model, generator)
        t = cfg.training
        if t.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self.net.parameters(), lr=t.lr)
        self.monitor = DivergenceMonitor(cfg.divergence, cfg.model.vocab_size, "twin")
        self.ema = ParameterEMA(t.ema, dict(self.net.named_parameters())) if t.ema > 0 else None

    def train_step(self, idx: Tensor, targets: Tensor, lr: float, *, health: bool = False) -> StepOutcome:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.net.loss(idx, targets)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(dict(self.net.named_parameters()))
        return StepOutcome(loss=float(loss.detach()), residual=0.0)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        params = dict(self.net.named_parameters())
        saved = None
        if self.ema is not None:
            saved = {k: v.detach().clone() for k, v in params.items()}
            for k, v in params.items():
                v.copy_(self.ema.shadow[k])
        try:
            return sum(float(self.net.loss(i, t)) for i, t in batches) / len(batches)
        finally:
            if saved is not None:
                for k, v in params.items():
                    v.copy_(saved[k])

    @torch.no_grad()
    def next_token_logits(self, idx: Tensor) -> Tensor:
        return self.net(idx)[:, -1]

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "monitor": self.monitor.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, weights_only: bool = False) -> None:
        self.net.load_state_dict(state["net"])
        if weights_only:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.monitor.load_state_dict(state["monitor"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])


def free_phase_residual(model: EquilibriumTransformer, z: Tensor, x_in: Tensor, eps: float) -> float:
    with torch.no_grad():
        return float(one_step_residual(z, model.force(z, x_in), eps).max())
