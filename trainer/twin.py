"""Training paths: one EP path (analog or digital twin), BPTT on the same block, a BP transformer.

The twin rule (issue 5): analog and twin start from the same weights, see the same batches, and
learn by the same rule: plain SGD on the projections' port updates,

    W ← W − lr·Σ_{batch, tokens} δ uᵀ        (`Projection.apply_update(u, δ, lr)`)

with δ the output-side error of the mean-over-tokens cross-entropy, the same learning-rate
schedule, the same integrator (Euler, ε of the solver) and estimator settings. On the digital
twin the update is exact; on the analog path `AnalogProjection.apply_update` turns lr·δuᵀ into
pulse trains (aihwkit semantics: lr·|δ|·|u| in units of the device's dw_min sets the expected
number of coincident pulses per device, capped by the pulse-train length BL; see `crossbar`), so
one unit of lr means the same requested weight change on both paths; what the arrays then realise
is the devices' response (logged per projection as realised vs requested ΔW, `trainer.fidelity`).
The update each path requests differs too: the analog path's EP estimate comes from noisy,
quantised reads. The digital periphery (embeddings, LayerNorm, biases, qknorm gains) is updated
by the path's optimiser (SGD with lr·`periphery_lr_scale` in the twin rule).

An `EPPath` is composed, not subclassed (`build_ep_path`): a gradient estimator
(`ept_hw.estimators.GradientEstimator`: EP, or BPTT through the same block), a free phase (the
path's solver and stop rule through `relax`), stabiliser objects that each return a port update
(`trainer.stabilisers`: resreg from exact weights by default (on-chip as an option), jacreg
and eigreg as digital assists on the read-out weights), the validity gate (when the noise-aware residual is above its level the nudge is
skipped; the stabilisers still apply), an optimiser sink (`trainer.optimisers`: SGD, AdamW; plus
the parameter EMA) and a health probe (adjoint SNR on the analog path, the implicit gradient on
the digital one). `readout_copy` builds the read-out digital copy of a model.

Each path returns a `StepOutcome`; `trainer.loop` puts every path on one metrics row.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from ept_hw.estimators import EPEstimator, GradientEstimator, GradientResult, compare_gradients, free_phase
from ept_hw.model import EquilibriumTransformer, PROJECTION_NAMES
from ept_hw.projection import digital_factory
from ept_hw.references import BPTTReference, ImplicitReference
from ept_hw.relaxation import RelaxResult, SolverConfig, StopRule, WindowStop
from ept_hw.stability import eigenvalues_at_worst

from .analog import CommonNoise, set_common_blocks
from .bp_reference import BPTransformer
from .config import RunConfig
from .controllers import JacregController, ParameterEMA, ValidityGate
from .divergence import DivergenceMonitor
from .fidelity import realised_update
from .metrics import keys_of
from .optimisers import build_sink, trainable_tensors
from .stabilisers import Eigreg, Jacreg, PortUpdates, Resreg, Stabiliser, StepContext, update_norm

__all__ = ["StepOutcome", "TrainingPath", "EPPath", "BPPath", "build_ep_path", "build_stabilisers", "readout_copy",
           "analog_counters", "weight_gap"]


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
    resreg_cos: float | None = None  # analog health probe: on-chip vs exact-weight resreg
    resreg_norm_ratio: float | None = None
    # analog path: per projection, realised vs requested ΔW of this step (`trainer.fidelity`)
    realised_ratio: dict[str, float] | None = None
    realised_cos: dict[str, float] | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # other declared per-path metrics, by key

    def set_figures(self, figures: Mapping[str, float | None]) -> None:
        """Record a probe's or a stabiliser's figures (`health_*` into `health`, the rest by name:
        a field of this class, or any per-path metric declared in `trainer.metrics.METRICS`)."""
        for key, value in figures.items():
            if key.startswith("health_"):
                self.health[key] = value
            elif hasattr(self, key):
                setattr(self, key, value)
            elif key in keys_of("path"):
                self.figures[key] = value
            else:
                raise KeyError(f"StepOutcome has no figure {key!r} (declare it in trainer.metrics.METRICS)")

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


class TrainingPath(Protocol):
    """What the loop drives: one model trained on the run's batches (`EPPath`, `BPPath`)."""

    name: str
    analog: bool
    monitor: DivergenceMonitor

    def train_step(self, idx: Tensor, targets: Tensor, lr: float, *, health: bool = False) -> StepOutcome: ...

    def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float: ...

    def next_token_logits(self, idx: Tensor) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], *, weights_only: bool = False) -> None: ...


def readout_copy(model: EquilibriumTransformer, cache: EquilibriumTransformer | None = None) -> EquilibriumTransformer:
    """A digital model programmed from `model`'s read-out weights (`proj.weight`, the arrays'
    effective weights on the analog path), sharing its digital periphery (`params`). Digital
    assists (jacreg, eigreg), the stability monitor and the limit-cycle verdict run on it: through
    noisy reads an eigenvalue would be the noise's. `cache` (a previous copy of the same config)
    is re-programmed instead of building a new one."""
    copy = cache
    if copy is None:
        copy = EquilibriumTransformer(model.cfg, digital_factory, torch.Generator().manual_seed(0), dtype=model.dtype,
                                      device=model.device)
    for name, proj in model.projections.items():
        copy.projections[name].program(proj.weight)
    copy.params = model.params  # the periphery is digital: share it
    return copy


class AdjointSNRProbe:
    """Analog health probe: ‖ā‖ / spread of the adjoint over three repeated nudges from the same
    free phase (the read noise's share of the EP update), before the update."""

    def probe(self, path: "EPPath", idx: Tensor, targets: Tensor, fp: RelaxResult, est: GradientResult) -> dict[str, float]:
        adjoints = [est.adjoint]
        for _ in range(2):
            adjoints.append(path.estimate(idx, targets, fp).adjoint)
        a = torch.stack([x.double() for x in adjoints])
        mean = a.mean(dim=0)
        spread = math.sqrt(float((a - mean).pow(2).sum(dim=tuple(range(1, a.dim()))).mean()) * len(adjoints) / (len(adjoints) - 1))
        return {"adjoint_snr": float(mean.norm()) / spread if spread > 0 else math.inf}


class ImplicitHealthProbe:
    """Digital health probe: cosine and norm ratio of the estimate against the implicit (IFT)
    gradient at the same z*, and the cosine between two half-batch estimates (self-coherence)."""

    def probe(self, path: "EPPath", idx: Tensor, targets: Tensor, fp: RelaxResult, est: GradientResult) -> dict[str, float]:
        ref = ImplicitReference(path.cfg.solver, rtol=1e-6).compute(path.model, idx, targets, free=fp)
        cos, ratio = compare_gradients(est, ref)["all"]
        half = idx.shape[0] // 2
        if half >= 1:
            halves = []
            for sl in (slice(0, half), slice(half, 2 * half)):
                _, fph = path.free_phase(idx[sl])
                halves.append(path.estimator.compute(path.model, idx[sl], targets[sl], free=fph))
            coherence = compare_gradients(halves[0], halves[1])["all"][0]
        else:
            coherence = math.nan
        return {"health_cos": cos, "health_norm_ratio": ratio, "health_self_coherence": coherence}


class EPPath:
    """A block trained through its port updates: EP on the analog arrays or the digital twin, or
    BPTT through the same block (`build_ep_path`). It holds a gradient estimator, the stabilisers,
    the validity gate, an optimiser sink (+ parameter EMA) and a health probe; one step is the free
    phase, the task estimate (unless gated), the probe, each stabiliser's port update, one sink
    application."""

    def __init__(
        self,
        name: str,
        model: EquilibriumTransformer,
        cfg: RunConfig,
        *,
        analog: bool,
        probe_seed: int,
        estimator: GradientEstimator,
        free_solver: SolverConfig,
        free_stop: Callable[[], StopRule] | None,
        probe: AdjointSNRProbe | ImplicitHealthProbe | None,
        extra_generators: Mapping[str, torch.Generator] | None = None,
    ):
        self.name = name
        self.model = model
        self.cfg = cfg
        self.analog = analog
        self.estimator = estimator
        self.free_solver, self.free_stop = free_solver, free_stop
        self.health_probe = probe
        # common random numbers: the analog factory wrapped the projections (tile noise_mode "common")
        self.common_noise = analog and any(isinstance(p, CommonNoise) for p in model.projections.values())
        st = cfg.stabilisers
        self.controller = JacregController(st.jacreg)
        self.gate = ValidityGate(st.gate, st.gate_level)
        self.stabilisers = build_stabilisers(cfg, self.controller)
        self.monitor = DivergenceMonitor(cfg.divergence, cfg.model.vocab_size, name, model.dtype)
        self.probe_generator = torch.Generator().manual_seed(probe_seed)
        # Generators owned by the analog arrays (read noise, pulse sampling): checkpointed here so
        # that a resumed run draws exactly what the uninterrupted one would.
        self.extra_generators = dict(extra_generators or {})
        self.last_task_norm: float | None = None
        self._readout: EquilibriumTransformer | None = None
        self.sink = build_sink(model, cfg.training)
        self.ema = ParameterEMA(cfg.training.ema, trainable_tensors(model)) if cfg.training.ema > 0 else None

    def readout_model(self) -> EquilibriumTransformer:
        """The model itself on a digital path; the read-out digital copy (`readout_copy`) on the analog one."""
        if not self.analog:
            return self.model
        self._readout = readout_copy(self.model, self._readout)
        return self._readout

    def _stabiliser(self, name: str) -> Any:
        return next((s for s in self.stabilisers if s.name == name), None)

    # ------------------------------------------------------------------ free phase and estimate
    def free_phase(self, idx: Tensor) -> tuple[Tensor, RelaxResult]:
        """x_in and the free phase from it (the path's solver and stop rule, `relax`)."""
        return free_phase(self.model, idx, self.free_solver, None if self.free_stop is None else self.free_stop())

    def estimate(self, idx: Tensor, targets: Tensor, fp: RelaxResult) -> GradientResult:
        """The estimator's gradient from the free phase `fp`; with common random numbers the K
        nudged phases (`estimator.phases`) read the same noise."""
        if not self.common_noise:
            return self.estimator.compute(self.model, idx, targets, free=fp)
        set_common_blocks(self.model.projections, (self.estimator.phases, idx.shape[0]))
        try:
            return self.estimator.compute(self.model, idx, targets, free=fp)
        finally:
            set_common_blocks(self.model.projections, None)

    def stability(self, idx: Tensor) -> dict[str, Any]:
        """Leading Re μ, |Im μ| of J and |λ| of I + εJ at the operating point of the worst sequence
        of `idx` (by one-step residual), on the read-out model (the analog arrays' read-out weights:
        through noisy reads an eigenvalue would be the noise's). Small ARPACK settings (k =
        `training.stability_k`, tol `training.stability_tol`): a monitor, not a reference."""
        t = self.cfg.training
        model = self.readout_model()
        solver = self.cfg.solver
        x_in, r = free_phase(model, idx, solver)
        b, res, eig = eigenvalues_at_worst(model, x_in, r.z, solver.eps, k=t.stability_k, tol=t.stability_tol,
                                           ncv=max(2 * t.stability_k + 14, 16), maxiter=500,
                                           generator=torch.Generator().manual_seed(self.cfg.seed + 11))
        return {"re_mu": eig.lead_re_mu, "im_mu": eig.lead_im_mu, "abs_lambda": eig.lead_abs_lambda,
                "converged": bool(r.converged), "residual": float(res[b].max()), "n_matvecs": eig.n_matvecs}

    # ------------------------------------------------------------------ one step
    def train_step(self, idx: Tensor, targets: Tensor, lr: float, *, health: bool = False) -> StepOutcome:
        self.last_probe_seconds = 0.0  # the health probe's own seconds in this step (the loop's time split)
        _, fp = self.free_phase(idx)
        z = fp.z.detach()
        residual = fp.residual_max
        gated = not self.gate.is_open(residual)
        jacreg = self._stabiliser("jacreg")
        out = StepOutcome(
            loss=math.nan, residual=residual, residual_raw=fp.residual_raw_max, residual_floor=fp.floor_max,
            free_steps=fp.n_steps, gated=gated, jacreg_lambda=self.controller.lam if jacreg is not None else None,
        )
        updates = PortUpdates()
        if not gated:
            est = self.estimate(idx, targets, fp)
            out.loss = est.loss
            out.nudge_steps = est.diagnostics.get("nudge_steps")
            updates.add(est.ports, est.digital_grads, task=True)
            self.last_task_norm = update_norm(est.weight_grads, est.digital_grads)
            if health and self.health_probe is not None:
                start = time.perf_counter()
                out.set_figures(self.health_probe.probe(self, idx, targets, fp, est))
                self.last_probe_seconds = time.perf_counter() - start
        else:
            with torch.no_grad():
                out.loss = float(self.model.loss(z, targets))
        ctx = StepContext(self.model, self.readout_model, idx, z, self.cfg.solver.eps, self.last_task_norm,
                          self.probe_generator, force=fp.force_mean, analog=self.analog, health=health)
        for stabiliser in self.stabilisers:
            part = stabiliser.port_update(ctx)
            if part is not None:
                updates.add(part.ports, part.digital, part.scale)
                out.set_figures(part.figures)
        self._apply(updates, lr, out)
        self.controller.update(residual)
        return out

    def _apply(self, updates: PortUpdates, lr: float, out: StepOutcome) -> None:
        dense = {name: updates.dense(name) for name in updates.ports}
        for name, g in dense.items():
            out.updates[name] = lr * g
        projections = self.model.projections
        before = {n: projections[n].weight.clone() for n in out.updates if n in projections} if self.analog else None
        self.sink.apply(updates, dense, lr)
        if before is not None:  # simulator-side: the arrays' weights read exactly (trainer.fidelity)

            after = {n: projections[n].weight for n in before}
            out.realised_ratio, out.realised_cos = realised_update(before, after, {n: -out.updates[n] for n in before})
        if self.ema is not None:
            self.ema.update(trainable_tensors(self.model))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, batches: list[tuple[Tensor, Tensor]]) -> float:
        swap = self.ema is not None
        if swap:
            saved = {k: v.clone() for k, v in trainable_tensors(self.model).items()}
            for k, v in trainable_tensors(self.model).items():
                v.copy_(self.ema.shadow[k])
        try:
            if len(batches) > 1 and len({tuple(i.shape) for i, _ in batches}) == 1:
                # batches of one shape: one stacked relaxation (every sequence relaxes on its own;
                # the stop waits for the slowest of all), the mean over all tokens = the mean of
                # the batch means
                batches = [(torch.cat([i for i, _ in batches]), torch.cat([t for _, t in batches]))]
            total = 0.0
            for idx, targets in batches:
                _, fp = self.free_phase(idx)
                with torch.no_grad():
                    total += float(self.model.loss(fp.z, targets))
            return total / len(batches)
        finally:
            if swap:
                for k, v in trainable_tensors(self.model).items():
                    v.copy_(saved[k])

    @torch.no_grad()
    def next_token_logits(self, idx: Tensor) -> Tensor:
        _, fp = self.free_phase(idx)
        return self.model.logits(fp.z)[:, -1]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        eigreg = self._stabiliser("eigreg")
        return {
            "model": self.model.state_dict(),
            "controller": self.controller.state_dict(),
            "monitor": self.monitor.state_dict(),
            "probe_generator": self.probe_generator.get_state(),
            "extra_generators": {k: g.get_state() for k, g in self.extra_generators.items()},
            "last_task_norm": self.last_task_norm,
            "eigreg_basis": None if eigreg is None else eigreg.basis,
            "optimizer": self.sink.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, weights_only: bool = False) -> None:
        self.model.load_state_dict(state["model"])
        self.sink.rebind()  # on the loaded tensors
        if self.ema is not None:
            self.ema = ParameterEMA(self.cfg.training.ema, trainable_tensors(self.model))
        if weights_only:
            return
        self.controller.load_state_dict(state["controller"])
        self.monitor.load_state_dict(state["monitor"])
        self.probe_generator.set_state(state["probe_generator"])
        for k, s in state["extra_generators"].items():
            if k in self.extra_generators:
                self.extra_generators[k].set_state(s)
        self.last_task_norm = state["last_task_norm"]
        eigreg = self._stabiliser("eigreg")
        if eigreg is not None:
            eigreg.basis = state.get("eigreg_basis")
        self.sink.load_state_dict(state["optimizer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    def weights(self) -> dict[str, Tensor]:
        return {n: p.weight.detach().clone() for n, p in self.model.projections.items()}


def build_stabilisers(cfg: RunConfig, controller: JacregController) -> list[Stabiliser]:
    """The stabilisers of `cfg.stabilisers`, in the order their updates are applied (resreg, jacreg, eigreg)."""
    st = cfg.stabilisers
    out: list[Stabiliser] = []
    if st.resreg > 0:
        out.append(Resreg(st.resreg, st.resreg_relative, st.resreg_delta, st.resreg_source))
    if st.jacreg_on:
        out.append(Jacreg(controller, st.jacreg_fd_step, cfg.model.damping))
    if st.eigreg.weight > 0:
        out.append(Eigreg(st.eigreg))
    return out


def build_ep_path(name: str, model: EquilibriumTransformer, cfg: RunConfig, *, analog: bool, probe_seed: int,
                  extra_generators: Mapping[str, torch.Generator] | None = None) -> EPPath:
    """The path of `cfg.mode` on `model`: EP ("compare", "ep") or BPTT ("bptt", digital only).

    EP: the `EPEstimator`; Euler free phases stop on the noise-aware `WindowStop` (window
    `analog.noise_window`, patience `analog.stop_patience`, floor factor
    `analog.stop_floor_factor`) on both paths, the digital-only
    solvers on their residual; health by adjoint SNR (analog) or against the implicit gradient
    (digital). BPTT: the `BPTTReference` through `training.bptt_steps` unrolled Euler steps, a
    free phase of exactly that many Euler steps (non-Euler solvers: to their residual), no probe.
    """
    s, a = cfg.solver, cfg.analog
    if cfg.mode == "bptt":
        steps = cfg.training.bptt_steps
        solver = s
        if s.method == "euler":
            solver = SolverConfig(method="euler", eps=s.eps, tol=0.0, min_steps=steps, max_steps=steps)
        return EPPath(name, model, cfg, analog=analog, probe_seed=probe_seed, estimator=BPTTReference(steps, s.eps),
                      free_solver=solver, free_stop=None, probe=None, extra_generators=extra_generators)
    stop = (lambda: WindowStop(a.noise_window, a.stop_patience, floor_factor=a.stop_floor_factor)) \
        if s.method == "euler" else None
    return EPPath(name, model, cfg, analog=analog, probe_seed=probe_seed, estimator=EPEstimator(cfg.estimator, s),
                  free_solver=s, free_stop=stop, probe=AdjointSNRProbe() if analog else ImplicitHealthProbe(),
                  extra_generators=extra_generators)


class BPPath:
    """A standard pre-LN transformer of matched width (same C, heads, FFN width, context, blocks = 1),
    trained by backprop with AdamW (or SGD): the non-equilibrium reference."""

    def __init__(self, cfg: RunConfig, generator: torch.Generator, device: torch.device | None = None):
        self.name = "twin"
        self.cfg = cfg
        self.analog = False
        self.net = BPTransformer(cfg.model, generator)  # drawn on the CPU, then moved
        if device is not None:
            self.net.to(device)
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
