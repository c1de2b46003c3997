"""The training loop: compare (analog + twin), single EP path, BPTT, BP transformer.

`run(cfg, run_dir)` is the library function behind `ept-hw compare` and `ept-hw train`. One
step = one batch drawn from the data generator, handed to every path; each path runs its free
phase, estimate and update (`trainer.twin`); one metrics row holds every path's figures.

`run` is a sequence of named phases: `_set_up` (configuration, data, tile, paths, checks: nothing
written), `_resume` or `_start` (+ the first checkpoint, which names a new run), then per step
`_train_and_evaluate` (with `_divergence`), the metrics row, `_checkpoint` (or `_diverged` /
`_interrupted`), and `_finish`.

Run directory (DESIGN §3), written through `trainer.rundir.RunDirectory`: `config.toml`
(resolved), `tokenizer.json`, `metrics.jsonl`, `checkpoints/` (the two latest, atomic),
`summary.json` (final figures, divergence event, physics choices, the analog arrays' pulse
counters, `time_split`: seconds spent training, in each instrument and in checkpoints), `events.jsonl` (divergence and interruption events), `conductances.pt` (analog weights
at start and end, for the report's histograms).

Nothing is written before the configuration, the data and the device have been checked; a new
run is then built in a locked staging folder and renamed once its first checkpoint (step 0)
exists, so a failed start leaves nothing. An existing run is never overwritten (resume it, or
choose another directory), and an analog run keeps its own resolved tile (`tile.toml`) and its
provenance: a resume never reads the device file or preset again.

Exact resume: the checkpoint holds every path's weights and device states, optimiser, controller,
monitor, every generator (data sampler, jacreg probes, the arrays' noise and pulse generators)
and the step; the metrics log is cut back to the checkpoint's step. A resumed run's rows then
equal an uninterrupted run's in every field but `wall_time`.

Ctrl-C: the first interrupt (at any moment of `run`, set-up included) is deferred to the end of
the current step, then a checkpoint is saved and the run exits cleanly (exit code 130); a second
Ctrl-C aborts at once (KeyboardInterrupt; a run still in its staging folder is removed).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm import tqdm

from ept_hw.config import ConfigError, resolve_torch_device, to_dict
from ept_hw.model import PROJECTION_NAMES, EquilibriumTransformer
from ept_hw.projection import digital_factory
from ept_hw.stability import detect_limit_cycle

from .analog import build_analog_factory, resolve_tile_config, self_contained_tile
from .checkpoint import config_differences, load_checkpoint
from .config import RunConfig, resolve_vocab
from .controllers import LRSchedule
from .data import TokenData, bigram_log_probs, bigram_loss, fixed_windows, prepare_data, sample_batch, unigram_entropy
from .divergence import DivergenceEvent
from .fidelity import mapping_figures, saturation_per_projection
from .metrics import empty_row, keys_of
from .parallel import RemotePath, parallel_reason
from .rundir import RunDirectory, RunLock, Staging, check_out_dir, package_version, provenance
from .twin import BPPath, StepOutcome, TrainingPath, _cos, analog_counters, build_ep_path, weight_gap

__all__ = ["RunResult", "run", "build_paths", "load_run", "physics_notes", "pulse_counters", "EXIT_DIVERGED",
           "EXIT_INTERRUPTED"]

logger = logging.getLogger(__name__)

EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    run_dir: Path
    steps_completed: int
    summary: dict[str, Any]
    exit_code: int = 0
    divergence: DivergenceEvent | None = None
    paths: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- building
def build_paths(cfg: RunConfig, tile: Any = None) -> dict[str, TrainingPath]:
    """The paths of a run, all from the same initial weights (generator seeded with `cfg.seed`).
    `tile`: the analog path's resolved `TileConfig` (default: resolved from `cfg.analog`)."""
    dtype = cfg.torch_dtype
    seed = cfg.seed
    device = resolve_torch_device("torch_device", cfg.torch_device)  # refused here if it is not available
    if cfg.mode == "bp":
        return {"twin": BPPath(cfg, torch.Generator().manual_seed(seed), device)}
    paths: dict[str, Any] = {}
    if cfg.uses_analog:
        factory, generators = build_analog_factory(cfg.analog, seed, tile=tile)
        model = EquilibriumTransformer(cfg.model, factory, torch.Generator().manual_seed(seed), dtype=dtype,
                                       device=device)
        paths["analog"] = build_ep_path("analog", model, cfg, analog=True, probe_seed=seed + 7, extra_generators=generators)
    if cfg.mode != "ep" or cfg.path == "twin":
        model = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(seed), dtype=dtype,
                                       device=device)
        model.compile_force(cfg.compile)
        paths["twin"] = build_ep_path("twin", model, cfg, analog=False, probe_seed=seed + 7)
    return paths


#: How each update algorithm turns the requested W ← W − lr·Σδuᵀ into pulses (physics notes).
_UPDATE_NOTES = {
    "sgd": "the crossbar converts each token's outer product into pulse trains (expected coincidences per device "
           "∝ lr·|δ||u|/dw_min, aihwkit semantics).",
    "mixed_precision": "mixed precision (aihwkit MixedPrecisionCompound): the outer products are summed in a "
                       "digital accumulator χ (full precision, one value per weight: digital work and memory), "
                       "and only whole multiples of the device's granularity are pulsed onto the arrays.",
    "ttv2": "Tiki-Taka v2: the outer products are pulsed onto a fast array A, whose columns are read at "
            "intervals into a digital buffer H and transferred to the weight array in pulses.",
    "c_ttv2": "chopped Tiki-Taka v2: as TTv2 with choppers (sign flips of A's update and read that cancel A's "
              "fixed offsets); digital buffer H.",
    "agad": "AGAD: as chopped TTv2, with A's reads taken against a dynamic reference (their running mean); "
            "digital buffer H.",
}


def physics_notes(cfg: RunConfig, tile: Any = None) -> list[str]:
    """The physics choices of the run, stated for the report. `tile`: the analog path's resolved
    `TileConfig` (its reads per MVM and noise mode)."""
    s, e, a, st, t = cfg.solver, cfg.estimator, cfg.analog, cfg.stabilisers, cfg.training
    notes = [
        f"Free and nudged phases integrate τ dz/dt = F(z) with explicit {s.method} (ε = {s.eps} τ) on every path; "
        f"free-phase tolerance {s.tol:g}, cap {s.max_steps} steps.",
    ]
    if cfg.uses_analog and tile is not None:
        notes += [
            f"Analog device: `{a.device}`, periphery `{a.periphery}`; every force evaluation reads each projection once "
            f"(noisy, quantised){'' if tile.n_reads == 1 else f', averaged over {tile.n_reads} reads'}; "
            "Jacobian products in the nudge are reads of the same arrays.",
            f"Read noise: `{tile.noise_mode}` ("
            + {"fresh": "a fresh draw per read", "common": "the same draws in the + and − nudged phases",
               "frozen": "one draw kept for every read"}[tile.noise_mode]
            + ").",
            f"Noise-aware stop: the residual of the time-averaged dynamics over a window of {a.noise_window} steps "
            f"(‖z_t − z_t−W‖/(W‖z̄‖)), stop at the tolerance, after {a.stop_patience} steps without improvement"
            + (f", or once it is within {a.stop_floor_factor:g}× the read-noise level of a window mean "
               "(estimated from the window's successive forces)" if a.stop_floor_factor > 0 else "") + "; "
            "the state handed to the nudge is the window mean; the floor is measured from two reads at that state. "
            "The gate, controller and divergence rules use this residual, never the raw one.",
            "Holomorphic nudging with N ≥ 3 is refused on the analog path (complex arithmetic); N = 2 is the centered pair.",
            f"Learning rate to pulses: W ← W − lr·Σδuᵀ is requested from the arrays (lr = {t.lr:g}); "
            + _UPDATE_NOTES.get(tile.algorithm, f"update algorithm `{tile.algorithm}` (crossbar.algorithms).")
        ]
    notes += [
        f"Estimator: {e.nudge} nudging, β (or r) = {e.beta:g}"
        + (f", N = {e.points}" if e.nudge == "holomorphic" else "")
        + f", AsymEP correction `{e.correction}`, T2 = {e.t2}, t2sel = {e.t2sel}. β is chosen against the read noise: "
        "the adjoint (z₋ − z₊)/2β divides the noise by 2β, its SNR is logged.",
        f"Stabilisers: resreg {st.resreg:g} ({'relative to the task update' if st.resreg_relative else 'absolute'}; "
        + ("from exact weights at the free-phase state on both paths (analog: a digital assist on the read-out "
           "weights), applied in port form δuᵀ through the pulses); " if st.resreg_source == "readout" else
           "on-chip: from the path's own reads at the window-mean state with the window-averaged force, applied in "
           "port form δuᵀ through the pulses); ")
        + (f"jacreg λ = {st.jacreg.initial:g} ({'controller on' if st.jacreg.enabled else 'frozen'}; digital assist on the "
           "analog path: from read-out weights)" if st.jacreg_on else "jacreg off")
        + (f"; eigreg {st.eigreg.weight:g} on {st.eigreg.on} (margin {st.eigreg.margin:g}; digital assist on the "
           "analog path: from read-out weights)" if st.eigreg.weight > 0 else "; eigreg off")
        + f"; validity gate {'on at ' + format(st.gate_level, 'g') if st.gate else 'off'}.",
        f"Optimiser: {t.optimizer} (lr {t.lr:g}, schedule {t.schedule.kind}); digital periphery (embeddings, LayerNorm, "
        "biases) by the same optimiser.",
    ]
    if t.stability_every != 0:
        notes.append(
            "Stability monitor: leading Re μ, |Im μ| of J and |λ| of I + εJ (ARPACK, k = "
            f"{t.stability_k}, tol {t.stability_tol:g}) on the worst sequence of the first validation batch, "
            + ("at every evaluation" if t.stability_every == -1 else f"every {t.stability_every} steps")
            + ("; the analog path's on its arrays' read-out weights (a digital copy), not through noisy reads." if cfg.uses_analog else ".")
        )
    if cfg.compile != "none" and (cfg.mode != "ep" or cfg.path == "twin") and cfg.mode != "bp":
        notes.append(
            f"The twin's plain force evaluations (free phase, nudged states, the nudge's Jᵀv) ran through torch.compile "
            f"(backend {cfg.compile}; had the compiler failed, the log has a warning and the eager force served the "
            "rest of the run): equal to the eager force up to float rounding, not bit for bit"
            + (" (aot_eager: bit for bit)." if cfg.compile == "aot_eager" else ".")
        )
    return notes


# ---------------------------------------------------------------------------------- run
class _Interrupt:
    """Defers the first SIGINT to the end of the step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> "_Interrupt":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _eval_batches(data: TokenData, cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(cfg.order_seed + 3)
    t = cfg.training
    return [sample_batch(data.val, t.batch_size, t.seq_len, gen) for _ in range(t.eval_batches)]


def _init_from_checkpoint(paths: Mapping[str, Any], path: Path, cfg: RunConfig) -> dict[str, Any]:
    """Program every path with the weights of a checkpoint (its twin path, else its only path)."""
    ck = load_checkpoint(path)
    src_name = "twin" if "twin" in ck["paths"] else next(iter(ck["paths"]))
    src = ck["paths"][src_name]
    if "model" not in src:
        raise ValueError(f"--init-ckpt {path}: the checkpoint holds no equilibrium-transformer weights (a BP run?)")
    state = src["model"]
    if state["config"] != to_dict(cfg.model):
        diffs = config_differences(state["config"], to_dict(cfg.model), "model.")
        raise ConfigError("init_ckpt", str(path), f"a checkpoint of the same model (differs in {', '.join(diffs)})")
    for p in paths.values():
        model = p.model
        for name, proj in model.projections.items():
            proj.program(_readout_weight(state["projections"][name]))
        for name, t in state["params"].items():
            model.params[name].copy_(t)
    return {"source": str(path), "source_path": src_name}


def _readout_weight(proj_state: Mapping[str, Any]) -> torch.Tensor:
    if "weight" in proj_state:
        return proj_state["weight"]
    raise ValueError("checkpoint projection state has no 'weight' entry to program from")


def _verdict(path: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Free-phase residual and verdict of a path's model on one validation batch."""
    idx, _ = batch
    _, fp = path.free_phase(idx)
    out = {"residual": fp.residual_max, "floor": fp.floor_max, "steps": fp.n_steps, "converged": fp.converged}
    try:
        # On the read-out weights (the analog arrays' effective weights): a verdict through noisy
        # reads would only ever see the noise floor.
        model = path.readout_model()
        x_in = model.embed(idx)
        rep = detect_limit_cycle(lambda z: model.force(z, x_in), x_in, eps=path.cfg.solver.eps, n_steps=1000)
        out["verdict"] = getattr(rep, "verdict", str(rep))
    except Exception as exc:  # the verdict is a diagnostic: never let it stop the run
        logger.warning("stability verdict unavailable: %s", exc)
        out["verdict"] = "converged" if fp.converged else "not converged"
    return out


def _stability(path: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any] | None:
    """`EPPath.stability` on the first validation batch (analog: on the read-out weights); None on
    a path without a relaxation or when ARPACK fails (a diagnostic never stops the run)."""
    if not hasattr(path, "stability"):
        return None
    try:
        return path.stability(batch[0])
    except Exception as exc:  # noqa: BLE001
        logger.warning("stability eigenvalues unavailable on %s: %s", getattr(path, "name", "?"), exc)
        return None


def run(
    cfg: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    init_ckpt: str | Path | None = None,
    progress: bool = False,
    stop_after: int | None = None,
    parallel_paths: bool = True,
) -> RunResult:
    """Train; `cfg` None with `resume` takes the saved configuration. `stop_after` ends the run
    (with a checkpoint) after that many steps in this call, as an interruption would.
    `parallel_paths`: a compare run on the CPU trains the twin in a forked worker process while the
    analog path trains here (`trainer.parallel`; bit-identical results; a 100-step demo took 0.68x
    the serial wall time on 2 cores), where the machine allows it; False keeps one process.

    A new run is built in a locked staging folder beside `run_dir` and renamed to it once its
    configuration, data and arrays are built and its first checkpoint (step 0) is written; any
    failure before that (a bad config found when the arrays are built, a second Ctrl-C) removes
    the staging folder, so a failed start leaves nothing. A resumed run holds the run's lock file
    for the whole call: a second process on the same run is refused, naming the holder's pid.
    The first Ctrl-C, at any moment of the call, ends the run after the current (or first) step
    with a checkpoint."""
    guard = _Guard()
    with _Interrupt() as interrupt:
        try:
            return _run(cfg, RunDirectory(run_dir), interrupt, guard, resume=resume, init_ckpt=init_ckpt,
                        progress=progress, stop_after=stop_after, parallel_paths=parallel_paths)
        except BaseException:
            guard.abandon()
            raise
        finally:
            guard.release()


class _Guard:
    """The staging folder of a new run, or the lock of a resumed one."""

    def __init__(self) -> None:
        self.staging: Staging | None = None
        self.lock: RunLock | None = None

    def open(self, rd: RunDirectory, resume: bool) -> None:
        if resume:
            self.lock = RunLock(rd.path).acquire()
        else:
            self.staging = Staging(rd.path).__enter__()
            rd.path = self.staging.folder

    def commit(self, rd: RunDirectory) -> None:
        if self.staging is not None:
            rd.path = self.staging.commit()

    def abandon(self) -> None:
        if self.staging is not None and self.staging.folder != self.staging.target:
            self.staging.discard()

    def release(self) -> None:
        if self.staging is not None:
            self.staging.lock.release()
        if self.lock is not None:
            self.lock.release()


@dataclass
class _Run:
    """The state a run's phases share."""

    cfg: RunConfig
    rd: RunDirectory
    data: TokenData
    tile: Any
    paths: dict[str, TrainingPath]
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]]
    summary: dict[str, Any]
    result: RunResult
    data_gen: torch.Generator | None = None
    step: int = 0
    wall_offset: float = 0.0
    last_ckpt_step: int = 0
    t0: float = 0.0
    stabs: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # this step's stability monitor
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIME_PARTS, 0.0))
    began: float = field(default_factory=time.perf_counter)  # this call's start (set-up included)
    total_before: float = 0.0  # the time split's total of the calls before a resume

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def clock(self, part: str, since: float) -> float:
        """Add the seconds since `since` to `part` (one of `TIME_PARTS`); returns now."""
        now = time.perf_counter()
        self.timers[part] += now - since
        return now


#: Where a run's wall time goes (summary.json `time_split`): training steps, and the instruments —
#: validation evaluation, the health probe (riding on a training step; its own seconds only), the
#: stability monitor, the metrics row (update cosines and weight gap between the paths: the
#: fidelity figures), the final evaluation on the fixed validation set — and checkpoints; "other" is the rest (set-up, data, files, the first
#: checkpoint). The total runs from the start of `run` (set-up and the initial evaluation
#: included, unlike `wall_time`), summed over resumed calls.
TIME_PARTS = ("train", "evaluation", "health_probe", "stability", "metrics_row", "final_evaluation", "checkpoint")
INSTRUMENT_PARTS = ("evaluation", "health_probe", "stability", "metrics_row", "final_evaluation")
STEP_PARTS = ("train", "health_probe", "evaluation", "stability")  # the parts of one path's share of a step


def time_split(timers: Mapping[str, float], total: float) -> dict[str, Any]:
    """summary.json's `time_split`: seconds per part, the rest of the `total` seconds, the total,
    and the instruments' share of it."""
    out: dict[str, Any] = {k: float(timers.get(k, 0.0)) for k in TIME_PARTS}
    out["other"] = max(0.0, total - sum(out.values()))
    out["total"] = float(total)
    out["instruments_share"] = sum(out[k] for k in INSTRUMENT_PARTS) / total if total > 0 else None
    return out


def _run(cfg: RunConfig | None, rd: RunDirectory, interrupt: _Interrupt, guard: _Guard, *, resume: bool,
         init_ckpt: str | Path | None, progress: bool, stop_after: int | None, parallel_paths: bool) -> RunResult:
    """The phases: set-up (checks; nothing written), then resume or a fresh start (a new run's
    first checkpoint gives it its name), steps until the end, a divergence, an interruption or
    `stop_after`, then finish."""
    began = time.perf_counter()
    r = _set_up(cfg, rd, resume, init_ckpt)
    r.began = began
    guard.open(rd, resume)  # everything checked: from here on we write (a new run into its staging folder)
    r.data_gen = torch.Generator().manual_seed(r.cfg.order_seed + 1)
    if resume:
        _resume(r)
    else:
        _start(r)
    log = rd.metrics_log(resume_step=r.step - 1 if resume else None)
    r.t0 = time.perf_counter() - r.wall_offset
    r.last_ckpt_step = r.step
    if not resume:  # the first checkpoint (step 0) makes the run valid: it gets its name
        try:
            _checkpoint(r, force=True)
            guard.commit(rd)
        except BaseException:
            log.close()
            raise
    r.result.run_dir = rd.path
    log.path = rd.metrics_path
    _start_workers(r, parallel_paths)
    try:
        _steps(r, log, interrupt, progress, stop_after)
        return _finish(r)
    finally:
        _stop_workers(r)


def _start_workers(r: _Run, enabled: bool) -> None:
    """Move the twin (every path but the first) into a forked worker when the run allows it."""
    reason = parallel_reason(enabled, len(r.paths), r.cfg.torch_device)
    if reason is None and r.step < r.cfg.training.steps:
        for name in list(r.paths)[1:]:
            r.paths[name] = RemotePath(r.paths[name])
        logger.info("training %s in a worker process", ", ".join(list(r.paths)[1:]))
    elif reason is not None:
        logger.info("paths train one after the other: %s", reason)
    r.summary["parallel_paths"] = reason or "the twin trains in a worker process beside the analog path"


def _stop_workers(r: _Run) -> None:
    """Bring every worker path's state back into this process and end the workers."""
    for name, p in list(r.paths.items()):
        if isinstance(p, RemotePath):
            r.paths[name] = p.close()


def _set_up(cfg: RunConfig | None, rd: RunDirectory, resume: bool, init_ckpt: str | Path | None) -> _Run:
    """Configuration, data, the analog tile, paths and their checks; nothing is written."""
    run_dir = rd.path
    if resume:
        if not rd.config_path.is_file():
            raise FileNotFoundError(f"{run_dir} holds no run to resume (no {rd.CONFIG})")
        saved = rd.config()
        if not rd.has_checkpoint():
            raise FileNotFoundError(f"{run_dir} has no checkpoint to resume from ({rd.latest_checkpoint_path})")
        data = prepare_data(saved.data, rd.tokenizer_path)
        if cfg is not None:
            current = resolve_vocab(cfg, data.vocab_size)
            diffs = config_differences(to_dict(saved), to_dict(current))
            if diffs:
                raise ConfigError("resume", ", ".join(diffs), f"the saved configuration of {run_dir} (these keys differ)")
        cfg = saved
    else:
        if cfg is None:
            raise ValueError("a configuration is needed for a new run")
        check_out_dir(run_dir)
        data = prepare_data(cfg.data)
        cfg = resolve_vocab(cfg, data.vocab_size)
    t = cfg.training
    if data.val.numel() <= t.seq_len + 1 or data.train.numel() <= t.seq_len + 1:
        raise ValueError(
            f"the data is too short for seq_len {t.seq_len}: {data.train.numel()} training and {data.val.numel()} "
            "validation tokens"
        )
    eval_batches = _eval_batches(data, cfg)
    tile = None
    if cfg.uses_analog:
        # the run's own copy on resume (never the file or preset it came from); else resolved now

        tile = rd.tile_config() if resume else self_contained_tile(resolve_tile_config(cfg.analog))
        if tile is None:  # a run written before runs kept their own copy: as it was built then
            tile = resolve_tile_config(cfg.analog)
    paths = build_paths(cfg, tile=tile)
    summary: dict[str, Any] = {}
    if init_ckpt is not None and not resume:
        init_info = _init_from_checkpoint(paths, Path(init_ckpt), cfg)
        init_info["verdict"] = {n: _verdict(p, eval_batches[0]) for n, p in paths.items()}
        summary["init_ckpt"] = init_info
    return _Run(cfg, rd, data, tile, paths, eval_batches, summary, RunResult(run_dir, 0, summary, paths=paths))


def _resume(r: _Run) -> None:
    """Every path, the data sampler and the clock from the latest checkpoint; the summary without
    the previous call's divergence or interruption; a `resumed` event."""
    ck, _ = r.rd.load_checkpoint()
    for name, p in r.paths.items():
        p.load_state_dict(ck["paths"][name])
    r.data_gen.set_state(ck["data_rng"])
    r.step = int(ck["step"])
    r.wall_offset = float(ck["wall_time"])
    r.summary.update(r.rd.read_summary())
    for part, seconds in (r.summary.get("time_split") or {}).items():  # a resumed run's times add up
        if part in r.timers and isinstance(seconds, (int, float)):
            r.timers[part] = float(seconds)
        elif part == "total" and isinstance(seconds, (int, float)):
            r.total_before = float(seconds)
    r.summary.pop("divergence", None)
    r.summary.pop("interrupted", None)
    r.result.steps_completed = r.step
    r.rd.append_event({"event": "resumed", "step": r.step, "command_line": list(sys.argv),
                       "package_version": package_version()})


def _start(r: _Run) -> None:
    """A new run: configuration, tokenizer, tile, provenance, the summary's fixed facts and initial figures."""
    cfg, data, paths, rd = r.cfg, r.data, r.paths, r.rd
    rd.write_config(cfg)
    rd.write_tokenizer(data.tokenizer)
    if r.tile is not None:
        rd.write_tile_config(r.tile)
    rd.write_provenance(provenance(cfg, tile=r.tile))
    init_info = r.summary.pop("init_ckpt", None)
    r.summary.update({
        "mode": cfg.mode,
        "path": cfg.path,
        "corpus": data.corpus_name,
        "validation_works": list(data.val_groups),
        "train_tokens": int(data.train.numel()),
        "val_tokens": int(data.val.numel()),
        "vocab_size": data.vocab_size,
        "unigram_entropy": unigram_entropy(data.val, data.vocab_size),
        "bigram_loss": bigram_loss(data.train, data.val, data.vocab_size),
        "physics": physics_notes(cfg, r.tile),
    })
    start = time.perf_counter()
    r.summary["initial_val_loss"] = {n: p.evaluate(r.eval_batches) for n, p in paths.items()}
    start = r.clock("evaluation", start)
    if cfg.training.stability_every != 0:
        r.summary["initial_stability"] = {n: _stability(p, r.eval_batches[0]) for n, p in paths.items()}
        r.clock("stability", start)
    if init_info is not None:
        r.summary["init_ckpt"] = init_info
    _save_conductances(rd, paths, "start")


def _steps(r: _Run, log: Any, interrupt: _Interrupt, progress: bool, stop_after: int | None) -> None:
    """Steps until the end, a divergence, an interruption or `stop_after` steps in this call."""
    t = r.cfg.training
    schedule = LRSchedule(t.schedule, t.steps)
    bar = None
    if progress:
        bar = tqdm(total=t.steps, initial=r.step, desc=f"{r.cfg.mode} {r.rd.path.name}", unit="step", dynamic_ncols=True)
    steps_this_call = 0
    try:
        while r.step < t.steps:
            outcomes, vals, event = _train_and_evaluate(r, schedule)
            start = time.perf_counter()
            row = _row(r.step, schedule.lr(t.lr, r.step), r.wall(), r.paths, outcomes, vals, r.stabs,
                       probe=_probe_due(t, r.step) or r.step + 1 == t.steps)
            r.clock("metrics_row", start)
            log.append(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({f"{n}": f"{o.loss:.3f}" for n, o in outcomes.items()}
                                | {f"val_{n}": f"{v:.3f}" for n, v in vals.items()})
            r.step += 1
            if event is not None:
                _diverged(r, event)
                break
            steps_this_call += 1
            stop_now = interrupt.requested or (stop_after is not None and steps_this_call >= stop_after)
            start = time.perf_counter()
            _checkpoint(r, force=stop_now)
            r.clock("checkpoint", start)
            if stop_now and r.step < t.steps:
                _interrupted(r, interrupt.requested)
                break
    finally:
        if bar is not None:
            bar.close()
        log.close()


def _train_and_evaluate(r: _Run, schedule: LRSchedule) -> tuple[dict[str, StepOutcome], dict[str, float], DivergenceEvent | None]:
    """One step on every path (same batch), the evaluations and monitors due at it, and the first
    divergence it shows (a non-finite relaxation, a monitor rule, a non-finite update or validation loss).
    A path in a worker process (`RemotePath`) gets its share first and runs while the others run here."""
    t, step = r.cfg.training, r.step
    idx, targets = sample_batch(r.data.train, t.batch_size, t.seq_len, r.data_gen)
    lr = schedule.lr(t.lr, step)
    health = _probe_due(t, step)
    evaluate = (step + 1) % t.eval_interval == 0 or step + 1 == t.steps
    stab_now = (t.stability_every > 0 and (step + 1) % t.stability_every == 0) or (t.stability_every == -1 and evaluate)
    args = (idx, targets, lr, health, evaluate, stab_now, r.eval_batches)
    remote = [n for n, p in r.paths.items() if isinstance(p, RemotePath)]
    for name in remote:
        r.paths[name].submit(_path_step, *args)
    results: dict[str, tuple[Any, ...] | BaseException] = {}
    failed = False
    for name, p in r.paths.items():
        if name in remote or failed:
            continue
        try:
            results[name] = _path_step(p, *args)
        except FloatingPointError as exc:  # NaN/inf inside a relaxation (NonFiniteStateError)
            results[name], failed = exc, True
        else:
            for part, seconds in results[name][3].items():
                r.timers[part] += seconds
    waited = time.perf_counter()
    for name in remote:
        try:
            results[name] = r.paths[name].collect()
        except FloatingPointError as exc:
            results[name] = exc
    _share_wait(r, time.perf_counter() - waited, [results[n][3] for n in remote if not isinstance(results[n], BaseException)])
    outcomes: dict[str, StepOutcome] = {}
    vals: dict[str, float] = {}
    r.stabs = {}
    for name in r.paths:
        res = results.get(name)
        if res is None:
            continue
        if isinstance(res, BaseException):
            outcomes[name] = StepOutcome(loss=math.nan, residual=math.nan)
            return outcomes, vals, DivergenceEvent("non_finite", step, name, f"{name}: step {step}: {res}", math.nan, math.nan)
        outcomes[name], val, stab, _ = res
        if val is not None:
            vals[name] = val
        if stab_now:
            r.stabs[name] = stab
    return outcomes, vals, _divergence(r, outcomes, vals)


def _path_step(p: Any, idx: torch.Tensor, targets: torch.Tensor, lr: float, health: bool, evaluate: bool,
               stab_now: bool, eval_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, ...]:
    """One path's share of a step: the training step, the evaluation and stability monitor when due;
    returns (outcome, validation loss or None, stability or None, seconds per time-split part)."""
    secs = dict.fromkeys(STEP_PARTS, 0.0)
    start = time.perf_counter()
    outcome = p.train_step(idx, targets, lr, health=health)
    now = time.perf_counter()
    probe = float(getattr(p, "last_probe_seconds", 0.0)) if health else 0.0
    secs["train"], secs["health_probe"] = now - start - probe, probe
    val = stab = None
    if evaluate:
        val = p.evaluate(eval_batches)
        now, before = time.perf_counter(), now
        secs["evaluation"] = now - before
    if stab_now:
        stab = _stability(p, eval_batches[0])
        secs["stability"] = time.perf_counter() - now
    return outcome, val, stab, secs


def _share_wait(r: _Run, waited: float, remote_secs: list[Mapping[str, float]]) -> None:
    """Add the seconds spent waiting for worker paths to the time split, in proportion to the parts
    of the worker's own step (the parts the wait was for; all to training when nothing is known)."""
    totals = {k: sum(s.get(k, 0.0) for s in remote_secs) for k in STEP_PARTS}
    norm = sum(totals.values())
    if norm <= 0:
        r.timers["train"] += waited
        return
    for part, seconds in totals.items():
        r.timers[part] += waited * seconds / norm


def _probe_due(t: Any, step: int) -> bool:
    """Whether `step` is a health-probe step (every `training.health_interval` steps)."""
    return t.health_interval > 0 and (step + 1) % t.health_interval == 0


def _divergence(r: _Run, outcomes: Mapping[str, StepOutcome], vals: Mapping[str, float]) -> DivergenceEvent | None:
    step = r.step
    for name, p in r.paths.items():
        o = outcomes[name]
        event = p.monitor.check(step, o.loss, o.residual)
        if event is None and not _finite_update(o):
            event = DivergenceEvent("non_finite", step, name, f"{name}: step {step}: non-finite weight update", o.loss, o.residual)
        if event is None and name in vals and not math.isfinite(vals[name]):
            event = DivergenceEvent("non_finite", step, name, f"{name}: step {step}: non-finite validation loss", vals[name], o.residual)
        if event is not None:
            return event
    return None


def _diverged(r: _Run, event: DivergenceEvent) -> None:
    r.result.divergence = event
    r.summary["divergence"] = event.to_dict() | {"last_good_checkpoint_step": r.last_ckpt_step}
    r.rd.append_event({"event": "divergence", **event.to_dict()})
    logger.error("divergence: %s (last good checkpoint: step %d)", event.message, r.last_ckpt_step)
    r.result.exit_code = EXIT_DIVERGED


def _checkpoint(r: _Run, *, force: bool) -> None:
    """Every `checkpoint_interval` steps, at the last step, and when forced (the first one of a new
    run, a run stopping early)."""
    t = r.cfg.training
    if not (r.step % t.checkpoint_interval == 0 or r.step == t.steps or force):
        return
    r.rd.save_checkpoint({
        "step": r.step,
        "config": to_dict(r.cfg),
        "paths": {n: p.state_dict() for n, p in r.paths.items()},
        "data_rng": r.data_gen.get_state(),
        "wall_time": r.wall(),
    })
    r.last_ckpt_step = r.step


def _interrupted(r: _Run, by_user: bool) -> None:
    r.summary["interrupted"] = {"step": r.step}
    if by_user:
        r.rd.append_event({"event": "interrupted", "step": r.step})
        r.result.exit_code = EXIT_INTERRUPTED


def _finish(r: _Run) -> RunResult:
    """Final conductances (unless diverged), the summary's final figures and the analog arrays'
    pulse counters, the result."""
    r.result.steps_completed = r.step
    if r.result.divergence is None:
        _save_conductances(r.rd, r.paths, "end")
    r.summary["steps_completed"] = r.step
    if r.result.divergence is None and r.step == r.cfg.training.steps and r.cfg.training.final_eval_tokens > 0:
        start = time.perf_counter()
        r.summary["final_eval"] = final_evaluation(r.paths, r.data, r.cfg)
        r.clock("final_evaluation", start)
    r.summary["wall_time"] = r.wall()
    final = r.summary.get("final_eval")
    r.summary["final_val_loss"] = dict(final["loss"]) if final else r.rd.final_val_losses()
    r.summary["time_split"] = time_split(r.timers, r.total_before + time.perf_counter() - r.began)
    if "analog" in r.paths:
        r.summary["analog_counters"] = pulse_counters(r.paths["analog"].model, r.step)
    r.rd.write_summary(r.summary)
    r.result.summary = r.summary
    return r.result


FINAL_EVAL_CHUNKS = 16


def final_evaluation(paths: Mapping[str, Any], data: TokenData, cfg: RunConfig) -> dict[str, Any]:
    """Every path on the fixed validation set (`training.final_eval_tokens`, `fixed_windows`):
    the mean loss, its standard error over `FINAL_EVAL_CHUNKS` equal chunks of windows (each chunk
    one evaluation batch), the paired analog − twin gap and its standard error (same chunks), and
    the corpus baselines on exactly the scored tokens: the unigram entropy of the targets and the
    add-0.05 bigram table fitted on the training split."""
    t = cfg.training
    idx, targets = fixed_windows(data.val, t.seq_len, t.final_eval_tokens)
    n_chunks = min(FINAL_EVAL_CHUNKS, idx.shape[0])
    chunks = list(zip(idx.tensor_split(n_chunks), targets.tensor_split(n_chunks)))
    weights = torch.tensor([float(c[1].numel()) for c in chunks], dtype=torch.float64)
    logger.info("final evaluation on the fixed validation set: %d windows, %d tokens", idx.shape[0], targets.numel())
    remote = [n for n, p in paths.items() if isinstance(p, RemotePath)]
    for n in remote:  # a worker path evaluates while the others evaluate here
        paths[n].submit(_chunk_losses, chunks)
    losses = {n: _chunk_losses(p, chunks) for n, p in paths.items() if n not in remote}
    losses.update({n: paths[n].collect() for n in remote})
    per_chunk = {n: torch.tensor(losses[n], dtype=torch.float64) for n in paths}

    def mean_se(x: torch.Tensor) -> tuple[float, float]:
        w = weights / weights.sum()
        m = float((w * x).sum())
        if len(x) < 2:
            return m, math.nan
        var = float((w * (x - m) ** 2).sum()) * len(x) / (len(x) - 1)
        return m, math.sqrt(var / len(x))

    out: dict[str, Any] = {"tokens": int(targets.numel()), "windows": int(idx.shape[0]), "chunks": n_chunks,
                           "seq_len": t.seq_len, "loss": {}, "stderr": {}}
    for n, x in per_chunk.items():
        out["loss"][n], out["stderr"][n] = mean_se(x)
    if "analog" in per_chunk and "twin" in per_chunk:
        out["gap"], out["gap_stderr"] = mean_se(per_chunk["analog"] - per_chunk["twin"])
    log_p = bigram_log_probs(data.train, data.vocab_size)
    out["bigram_loss"] = float(-log_p[idx.reshape(-1).long(), targets.reshape(-1).long()].mean())
    out["unigram_entropy"] = unigram_entropy(targets, data.vocab_size)
    return out


def _chunk_losses(p: Any, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """A path's validation loss on each chunk of the fixed set (one evaluation batch each)."""
    return [p.evaluate([c]) for c in chunks]


def _finite_update(o: StepOutcome) -> bool:
    n = o.update_norm
    return n is None or math.isfinite(n)


def _row(step: int, lr: float, wall: float, paths: Mapping[str, Any], outcomes: Mapping[str, StepOutcome],
         vals: Mapping[str, float], stabs: Mapping[str, Mapping[str, Any] | None] | None = None,
         probe: bool = False) -> dict[str, Any]:
    """One metrics row; `probe`: also the figures logged at health probes (and the last step):
    per-projection saturation, analog/twin weight-norm ratio, the twin's weights outside the analog range."""
    row = empty_row(step)
    row["lr"] = lr
    row["wall_time"] = wall
    for name, o in outcomes.items():
        p = paths[name]
        for key in keys_of("path"):  # every declared per-path metric the step outcome carries
            if hasattr(o, key):
                row[f"{name}_{key}"] = getattr(o, key)
            elif key in o.figures:
                row[f"{name}_{key}"] = o.figures[key]
        row[f"{name}_val_loss"] = vals.get(name)
        stab = (stabs or {}).get(name)
        if stab:
            for key in ("re_mu", "im_mu", "abs_lambda"):
                row[f"{name}_{key}"] = stab[key]
        if getattr(p, "analog", False):
            row.update({f"{name}_{k}": v for k, v in analog_counters(p.model).items()})
            if probe:
                row[f"{name}_saturation_per_projection"] = saturation_per_projection(p.model)
        if o.health:
            row.update(o.health)
    if "analog" in outcomes and "twin" in outcomes:
        ua, ut = outcomes["analog"].updates, outcomes["twin"].updates
        row["update_cos"] = {n: (_cos(ua[n], ut[n]) if n in ua and n in ut else None) for n in PROJECTION_NAMES}
        gap, per = weight_gap(paths["analog"].model, paths["twin"].model)
        row["weight_gap"] = gap
        row["weight_gap_per_projection"] = per
        if probe:
            row.update(mapping_figures(paths["analog"].model, paths["twin"].model))
    return row


def pulse_counters(model: Any, step: int) -> dict[str, Any]:
    """Endurance figures of an analog model's arrays, for the summary: the largest pulse count of
    any unit cell, all pulses, the number of unit cells (one per weight) and the step they refer to."""
    pmax = total = 0.0
    cells = 0
    for proj in model.projections.values():
        counters = getattr(proj, "counters", None)
        if counters is None:
            continue
        c = counters()
        n = int(proj.in_features * proj.out_features)
        pmax = max(pmax, float(c.get("pulses_max", 0.0)))
        total += float(c.get("pulses_mean", 0.0)) * n
        cells += n
    return {"max_pulses_per_device": pmax, "total_pulses": total, "n_weights": cells, "checkpoint_step": step}


def _save_conductances(rd: RunDirectory, paths: Mapping[str, Any], when: str) -> None:
    if "analog" not in paths:
        return
    rd.save_conductances(when, {n: p.weight.detach().clone() for n, p in paths["analog"].model.projections.items()})


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[RunConfig, TokenData, dict[str, Any]]:
    """Config, data and paths of a run restored from its latest readable checkpoint (or the
    checkpoint file `checkpoint`), for `sample`, `stability` and the benchmarks."""
    rd = RunDirectory(run_dir).require_run()
    cfg = rd.config()
    data = prepare_data(cfg.data, rd.tokenizer_path)
    paths = build_paths(cfg, tile=rd.tile_config() if cfg.uses_analog else None)
    ck = load_checkpoint(checkpoint) if checkpoint is not None else rd.load_checkpoint()[0]
    for name, p in paths.items():
        p.load_state_dict(ck["paths"][name])
    return cfg, data, paths
