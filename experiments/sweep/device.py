"""The device sweep: every point a short analog/twin `compare`, then tables, plots and requirements.

`compare_point` is the point function (module level, so that worker processes import it);
`run_device_sweep` checks the base configuration, runs the points through the engine
(`experiments.sweep.engine`) and derives the requirements (`experiments.sweep.requirements`).
Its settings come as one `SweepOptions` object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from crossbar.config import save_tile_config
from ept_hw.config import ConfigError, check_range
from ept_hw.model import EquilibriumTransformer
from ept_hw.projection import digital_factory
from ept_hw.relaxation import SolverConfig
from ept_hw.stability import find_operating_point, leading_eigenvalues
from experiments.presets import load_run_config
from trainer.analog import resolve_tile_config
from trainer.config import merge
from trainer.data import sample_batch
from trainer.loop import EXIT_INTERRUPTED, load_run, run
from trainer.rundir import RunDirectory, RunLock, check_out_dir

from .axes import AXES, PERIPHERY_AXES, apply_overrides, base_values, point_id, sweep_points
from .engine import MANIFEST, PointFn, RESULT_KEYS, Task, check_backend, check_manifest, run_sweep
from .requirements import Requirement, derive_requirements
from .tables import plot_gaps, sweep_rows, write_tables

__all__ = ["SweepOptions", "SweepResult", "run_device_sweep", "compare_point", "base_tile", "leading_re_mu"]

logger = logging.getLogger(__name__)


def _run_config(context: Mapping[str, Any], analog: Mapping[str, Any] | None = None) -> Any:
    overrides = merge(dict(context.get("run_overrides") or {}), {"mode": "compare"})
    analog_base = {"device": context["device"], "periphery": context.get("periphery", "default")}
    overrides = merge(overrides, {"analog": merge(analog_base, dict(analog or {}))})
    return load_run_config(context["model"], overrides)


def base_tile(context: Mapping[str, Any]) -> Any:
    """The base tile of a sweep, resolved exactly as `compare` resolves `--device` and `--periphery`."""
    return resolve_tile_config(_run_config(context).analog)


def leading_re_mu(run_dir: str | Path, n_samples: int = 2) -> float:
    """Largest Re μ of the relaxation's Jacobian at the analog path's final weights.

    As `ept_hw.stability` advises for the analog path, the Jacobian is taken on a digital copy
    programmed from the arrays' read-out (noise-free) weights, at the operating point of
    `n_samples` validation sequences.
    """
    cfg, data, paths = load_run(run_dir)
    analog = paths["analog"].model
    copy = EquilibriumTransformer(cfg.model, digital_factory, torch.Generator().manual_seed(0), dtype=analog.dtype)
    for name, proj in analog.projections.items():
        copy.projections[name].program(proj.weight)
    copy.params = analog.params
    idx, _ = sample_batch(data.val, n_samples, cfg.training.seq_len, torch.Generator().manual_seed(cfg.seed + 3))
    with torch.no_grad():
        x_in = copy.embed(idx)
    force = lambda z: copy.force(z, x_in)  # noqa: E731
    eps = cfg.solver.eps
    op = find_operating_point(force, x_in, SolverConfig(method="euler", eps=eps, tol=1e-5, max_steps=600), long_steps=1500)
    # a diagnostic column: ARPACK to 1e-4 costs a fraction of the default 1e-10 and moves Re mu by far less
    report = leading_eigenvalues(force, op.z, eps, k=4, tol=1e-4, generator=torch.Generator().manual_seed(0))
    return float(report.lead_re_mu)


#: Seed index k of a multi-seed sweep runs with seed = base seed + SEED_STRIDE * k on the base seed's
#: data order (`RunConfig.data_seed`); k = 0 is the base configuration itself, unchanged.
SEED_STRIDE = 10007


def output_fractions(run_dir: str | Path, n_samples: int = 2) -> dict[str, float]:
    """Fractions of the analog path's forward (ADC) outputs that are exactly zero, and that sit at the
    largest magnitude any output of the same projection reached (clipped), over one free phase on
    `n_samples` validation sequences at the run's final weights."""
    cfg, data, paths = load_run(run_dir)
    path = paths["analog"]
    idx, _ = sample_batch(data.val, n_samples, cfg.training.seq_len, torch.Generator().manual_seed(cfg.order_seed + 3))
    outputs: dict[str, list[torch.Tensor]] = {}
    for name, proj in path.model.projections.items():
        def wrapped(u, _read=proj.forward, _name=name):
            y = _read(u)
            outputs.setdefault(_name, []).append(y.detach().abs().flatten())
            return y
        proj.forward = wrapped
    with torch.no_grad():
        path.free_phase(idx)
    zero = clipped = total = 0
    for ys in outputs.values():
        y = torch.cat(ys)
        top = float(y.max()) if y.numel() else 0.0
        zero += int((y == 0).sum())
        clipped += int((y >= top).sum()) if top > 0 else 0
        total += y.numel()
    return {"output_zero_fraction": zero / total if total else None,
            "output_clipped_fraction": clipped / total if total else None}


def _update_cos_mean(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over projections and over the second half of the run of the analog/twin update cosine."""
    half = rows[len(rows) // 2:]
    vals = [float(c) for r in half for c in (r.get("update_cos") or {}).values()
            if c is not None and math.isfinite(float(c))]
    return sum(vals) / len(vals) if vals else None


def point_config(overrides: Mapping[str, Any], context: Mapping[str, Any], tile_path: Path) -> Any:
    """The run configuration of one task: the base with the point's tile and the task's seed."""
    cfg = _run_config(context, {"device": str(tile_path.resolve()), "periphery": "default"})
    # the point's tile file is the whole tile (the base's `analog.tile` overrides are already in it)
    cfg = dataclasses.replace(cfg, analog=dataclasses.replace(cfg.analog, tile={}))
    k = int(context.get("point_seed") or 0)
    if k:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + SEED_STRIDE * k, data_seed=cfg.order_seed)
    return cfg


def compare_point(overrides: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """One sweep task: a short `compare` run with the base tile changed by `overrides`.

    Seed index k (``context["point_seed"]``, 0 when absent) runs with seed base + `SEED_STRIDE`·k on
    the base seed's data order: new initial weights (unless ``context["init_ckpt"]`` programs every
    point from one checkpoint), new device-to-device samples and new read/update noise streams;
    every point of seed k has the same twin (same weights, batches and generators: common random
    numbers), so gap_k = analog_k − twin_k is paired across points. The twin is run again inside
    every point's `compare` (bit-identical within a seed), not cached. The task's tile is written to
    ``tiles/<task>.toml`` and its run to ``runs/<task>/``. A run that diverges is a result (gap
    null, ``analog_diverged`` true), not an error; an interrupted run raises `KeyboardInterrupt`
    so that the task is not recorded. The record carries the figures that `stats.degenerate_reasons`
    judges: output zero/clipped fractions, mean update cosine, initial and final validation losses.
    """
    torch.set_num_threads(int(context.get("_threads", 1)))
    out = Path(context["_out_dir"])
    k = context.get("point_seed")
    tid = point_id(overrides) if k is None else f"{point_id(overrides)}-s{k}"
    tile = point_tile(overrides, context)
    tile_path = out / "tiles" / f"{tid}.toml"
    tile_path.parent.mkdir(parents=True, exist_ok=True)
    save_tile_config(tile_path, tile)
    cfg = point_config(overrides, context, tile_path)
    run_dir = out / "runs" / tid
    if run_dir.exists():  # left by an interrupted attempt at this task (it has no record): start over
        shutil.rmtree(run_dir)
    init_ckpt = context.get("init_ckpt")
    # one process per task: the sweep's workers already share the cores between tasks
    result = run(cfg, run_dir, progress=False, init_ckpt=init_ckpt, parallel_paths=False)
    if result.exit_code == EXIT_INTERRUPTED or result.summary.get("interrupted"):
        raise KeyboardInterrupt
    rows = RunDirectory(run_dir).read_metrics()

    def last(key: str) -> Any:
        return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)

    a_val, t_val = last("analog_val_loss"), last("twin_val_loss")
    diverged = result.summary.get("divergence")
    initial = result.summary.get("initial_val_loss") or {}
    out_row: dict[str, Any] = {
        "analog_val_loss": a_val,
        "twin_val_loss": t_val,
        "gap": None if diverged or a_val is None or t_val is None else a_val - t_val,
        "analog_residual": last("analog_residual"),
        "twin_residual": last("twin_residual"),
        "analog_diverged": bool(diverged),
        "divergence": diverged,
        "steps": result.steps_completed,
        "seed": cfg.seed,
        "run_dir": str(run_dir.relative_to(out)),
        "tile": str(tile_path.relative_to(out)),
        "unigram_entropy": result.summary.get("unigram_entropy"),
        "analog_initial_val_loss": initial.get("analog"),
        "twin_initial_val_loss": initial.get("twin"),
        "update_cos_mean": _update_cos_mean(rows),
    }
    counts = RunDirectory(run_dir).read_summary().get("analog_counters") or {}  # the trainer's summary figure
    if counts.get("n_weights") and result.steps_completed:
        out_row["pulses_per_device"] = counts["total_pulses"] / counts["n_weights"] / result.steps_completed
        out_row["max_pulses_per_device"] = counts["max_pulses_per_device"]
    if not diverged:
        out_row.update(output_fractions(run_dir))
    if context.get("_re_mu", True) and not diverged:
        try:
            out_row["re_mu"] = leading_re_mu(run_dir)
        except Exception as exc:  # noqa: BLE001 - a diagnostic column: keep the point
            logger.warning("point %s: Re mu unavailable: %s", tid, exc)
            out_row["re_mu_error"] = f"{type(exc).__name__}: {exc}"
    return out_row


def point_tile(overrides: Mapping[str, Any], context: Mapping[str, Any]) -> Any:
    """The point's `TileConfig` (the base with the axis values applied, validated by the config
    constructors); raises `ConfigError` for an invalid combination."""
    base = base_tile(context)
    if base.forward.is_perfect and set(overrides) & set(PERIPHERY_AXES):
        raise ConfigError("axis", ", ".join(sorted(set(overrides) & set(PERIPHERY_AXES))),
                          "an axis of the device (the base periphery is perfect: use --periphery default)")
    return apply_overrides(base, overrides)


@dataclass
class SweepResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    requirements: list[Requirement]
    base_values: dict[str, Any]
    csv_path: Path
    json_path: Path
    plots: list[Path]


@dataclass(frozen=True)
class SweepOptions:
    """Everything `run_device_sweep` needs besides where to write (one object instead of many arguments).

    `model`, `device`, `periphery`, `run_overrides` (any run-config keys, as `--set` gives them)
    and `init_ckpt` (every point starts from this checkpoint's weights, programmed onto the arrays)
    make the base configuration, pinned in the sweep manifest; `axes` maps axis names to their
    values; `grid` runs the full grid instead of one axis at a time; `seeds` is the number of seeds
    per point (paired gaps, see `compare_point`). `workers`, `threads`, `retry_failed`, `re_mu`,
    `backend` ("local" | "ray") and `ray_address` are run mechanics: they may change between
    resumes.
    """

    model: str
    device: str
    axes: Mapping[str, Sequence[Any]]
    tolerance: float = 0.05
    grid: bool = False
    seeds: int = 3
    workers: int = 1
    periphery: str = "default"
    run_overrides: Mapping[str, Any] = field(default_factory=dict)
    init_ckpt: str | None = None
    retry_failed: bool = False
    re_mu: bool = True
    threads: int = 1
    backend: str = "local"
    ray_address: str | None = None

    def context(self, out: Path) -> dict[str, Any]:
        """The point functions' context: pinned physics keys, and "_" run mechanics."""
        ctx = {"model": self.model, "device": self.device, "periphery": self.periphery,
               "run_overrides": json.loads(json.dumps(dict(self.run_overrides or {}))),
               "_out_dir": str(out), "_re_mu": bool(self.re_mu), "_threads": int(self.threads)}
        if self.init_ckpt is not None:
            ctx["init_ckpt"] = str(Path(self.init_ckpt).resolve())
        return ctx


def run_device_sweep(
    out_dir: str | Path,
    options: SweepOptions,
    *,
    point_fn: PointFn = compare_point,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """`ept-hw sweep`: every point a short `compare` per seed; tables, plots and requirements under `out_dir`.

    Before anything runs: the base configuration (model preset + `run_overrides` + device +
    periphery), the backend and the `init_ckpt` file are checked (errors raise, nothing is
    written), and every point's tile is built through the config constructors; a point whose
    combination is invalid is recorded as "invalid" without running, the others run.
    """
    o = options
    if not o.axes:
        raise ConfigError("axis", None, "at least one --axis NAME=v1,v2,...")
    for name in o.axes:
        if name not in AXES:
            raise ConfigError("axis", name, "one of " + ", ".join(AXES))
    check_range("tolerance", o.tolerance, 0.0)
    if not isinstance(o.seeds, int) or isinstance(o.seeds, bool) or o.seeds < 1:
        raise ConfigError("seeds", o.seeds, "an integer >= 1")
    if o.init_ckpt is not None and not Path(o.init_ckpt).is_file():
        raise FileNotFoundError(f"--init-ckpt {o.init_ckpt}: no such checkpoint file"
                                + (" (a directory: give its checkpoints/last.pt)" if Path(o.init_ckpt).is_dir() else ""))
    out = Path(out_dir).resolve()
    if not (out / MANIFEST).is_file():  # a new sweep: a new (or empty) folder, never a run or someone's files
        check_out_dir(out)
    context = o.context(out)
    tile = base_tile(context)  # raises ConfigError on a bad model, device or override, before any work
    if tile.forward.is_perfect and set(o.axes) & set(PERIPHERY_AXES):
        raise ConfigError("axis", ", ".join(sorted(set(o.axes) & set(PERIPHERY_AXES))),
                          "an axis of the device (the base periphery is perfect: use --periphery default)")
    bases = base_values(tile)
    points = sweep_points(o.axes, grid=o.grid)
    if o.grid:
        points.insert(0, {})  # the base point: the device spec's device, periphery and loss curves
    seeds = list(range(o.seeds))
    invalid: dict[str, dict[str, Any]] = {}
    for p in points:
        try:
            point_tile(p, context)
        except ConfigError as exc:  # refused before running: recorded, never run, never passes
            for k in seeds:
                task = Task(p, k)
                invalid[task.task_id] = {"point_id": task.point_id, "task_id": task.task_id, "seed_index": k,
                                         "overrides": dict(p), "status": "invalid", "error": f"ConfigError: {exc}",
                                         "wall_time": 0.0, **{key: None for key in RESULT_KEYS}}
    check_manifest(out, context)  # a resume with other settings is refused before any backend starts
    check_backend(o.backend, o.ray_address)  # nothing is written when the backend cannot run
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # a second process on the same sweep is refused, naming the holder's pid
        records = run_sweep(point_fn, points, out, context=context, workers=o.workers, retry_failed=o.retry_failed,
                            on_record=on_record, seeds=seeds, backend=o.backend, ray_address=o.ray_address,
                            precomputed=invalid)
    names = list(o.axes)
    rows = sweep_rows(records, names, bases)
    reqs = derive_requirements(rows, names, o.tolerance, bases)
    csv_path, json_path = write_tables(rows, out, {
        "axes": {k: list(v) for k, v in o.axes.items()}, "tolerance": o.tolerance, "grid": o.grid,
        "seeds": o.seeds, "base_values": {k: bases.get(k) for k in names}, "model": o.model, "device": o.device,
        "periphery": o.periphery, "init_ckpt": context.get("init_ckpt"),
        "requirements": [r.to_dict() for r in reqs], "kind": "ept-hw device sweep",
    })
    plots = plot_gaps(rows, names, o.tolerance, out, bases)
    return SweepResult(out, rows, reqs, bases, csv_path, json_path, plots)
