"""The device sweep: every point a short analog/twin `compare`, then tables, plots and requirements.

`compare_point` is the point function (module level, so that worker processes import it);
`run_device_sweep` checks the base configuration, runs the points through the engine
(`experiments.sweep.engine`) and derives the requirements (`experiments.sweep.requirements`).
Its settings come as one `SweepOptions` object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ept_hw.config import ConfigError, check_range
from experiments.runfacts import checkpoint_pulse_counts

from .axes import AXES, PERIPHERY_AXES, analog_overrides, apply_overrides, base_values, point_id, sweep_points
from .engine import PointFn, run_sweep
from .requirements import Requirement, derive_requirements
from .tables import plot_gaps, sweep_rows, write_tables

__all__ = ["SweepOptions", "SweepResult", "run_device_sweep", "compare_point", "base_tile", "leading_re_mu"]

logger = logging.getLogger(__name__)


def _run_config(context: Mapping[str, Any], analog: Mapping[str, Any] | None = None) -> Any:
    from trainer.config import load_run_config, merge

    overrides = merge(dict(context.get("run_overrides") or {}), {"mode": "compare"})
    analog_base = {"device": context["device"], "periphery": context.get("periphery", "default")}
    overrides = merge(overrides, {"analog": merge(analog_base, dict(analog or {}))})
    return load_run_config(context["model"], overrides)


def base_tile(context: Mapping[str, Any]) -> Any:
    """The base tile of a sweep, resolved exactly as `compare` resolves `--device` and `--periphery`."""
    from trainer.analog import resolve_tile_config

    return resolve_tile_config(_run_config(context).analog)


def leading_re_mu(run_dir: str | Path, n_samples: int = 2) -> float:
    """Largest Re μ of the relaxation's Jacobian at the analog path's final weights.

    As `ept_hw.stability` advises for the analog path, the Jacobian is taken on a digital copy
    programmed from the arrays' read-out (noise-free) weights, at the operating point of
    `n_samples` validation sequences.
    """
    import torch

    from ept_hw.model import EquilibriumTransformer
    from ept_hw.projection import digital_factory
    from ept_hw.relaxation import SolverConfig
    from ept_hw.stability import find_operating_point, leading_eigenvalues
    from trainer.data import sample_batch
    from trainer.loop import load_run

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


def compare_point(overrides: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """One sweep point: a short `compare` run with the base tile changed by `overrides`.

    Every point has the same run configuration and seed, hence the same initial weights, batches,
    evaluation batches and generator seeds (common random numbers across points); only the tile
    differs. The point's tile is written to ``tiles/<id>.toml`` and its run to ``runs/<id>/``.
    A run that diverges is a result (gap null, ``analog_diverged`` true), not an error; an
    interrupted run raises `KeyboardInterrupt` so that the point is not recorded.
    """
    import shutil

    import torch

    from crossbar.config import save_tile_config
    from trainer.loop import EXIT_INTERRUPTED, run
    from trainer.metrics import read_metrics

    torch.set_num_threads(int(context.get("_threads", 1)))
    out = Path(context["_out_dir"])
    pid = point_id(overrides)
    base = base_tile(context)
    if base.forward.is_perfect and set(overrides) & set(PERIPHERY_AXES):
        raise ConfigError("axis", ", ".join(sorted(set(overrides) & set(PERIPHERY_AXES))),
                          "an axis of the device (the base periphery is perfect: use --periphery default)")
    tile = apply_overrides(base, overrides)
    tile_path = out / "tiles" / f"{pid}.toml"
    tile_path.parent.mkdir(parents=True, exist_ok=True)
    save_tile_config(tile_path, tile)
    analog = {"device": str(tile_path.resolve()), "periphery": "default", **analog_overrides(overrides)}
    cfg = _run_config(context, analog)
    run_dir = out / "runs" / pid
    if run_dir.exists():  # left by an interrupted attempt at this point (it has no record): start over
        shutil.rmtree(run_dir)
    result = run(cfg, run_dir, progress=False)
    if result.exit_code == EXIT_INTERRUPTED or result.summary.get("interrupted"):
        raise KeyboardInterrupt
    rows = read_metrics(run_dir / "metrics.jsonl")

    def last(key: str) -> Any:
        return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)

    a_val, t_val = last("analog_val_loss"), last("twin_val_loss")
    diverged = result.summary.get("divergence")
    out_row: dict[str, Any] = {
        "analog_val_loss": a_val,
        "twin_val_loss": t_val,
        "gap": None if diverged or a_val is None or t_val is None else a_val - t_val,
        "analog_residual": last("analog_residual"),
        "twin_residual": last("twin_residual"),
        "analog_diverged": bool(diverged),
        "divergence": diverged,
        "steps": result.steps_completed,
        "run_dir": str(run_dir.relative_to(out)),
        "tile": str(tile_path.relative_to(out)),
    }
    counts = checkpoint_pulse_counts(run_dir)
    if counts.get("n_weights") and result.steps_completed:
        out_row["pulses_per_device"] = counts["total_pulses"] / counts["n_weights"] / result.steps_completed
        out_row["max_pulses_per_device"] = counts["max_pulses_per_device"]
    if context.get("_re_mu", True) and not diverged:
        try:
            out_row["re_mu"] = leading_re_mu(run_dir)
        except Exception as exc:  # noqa: BLE001 - a diagnostic column: keep the point
            logger.warning("point %s: Re mu unavailable: %s", pid, exc)
            out_row["re_mu_error"] = f"{type(exc).__name__}: {exc}"
    return out_row


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
    """Everything `run_device_sweep` needs besides where to write (one object instead of 14 arguments).

    `model`, `device`, `periphery` and `run_overrides` (any run-config keys, as `--set` gives them)
    make the base configuration; `axes` maps axis names to their values; `grid` runs the full grid
    instead of one axis at a time. `workers`, `threads`, `retry_failed`, `re_mu` are run mechanics.
    """

    model: str
    device: str
    axes: Mapping[str, Sequence[Any]]
    tolerance: float = 0.05
    grid: bool = False
    workers: int = 1
    periphery: str = "default"
    run_overrides: Mapping[str, Any] = field(default_factory=dict)
    retry_failed: bool = False
    re_mu: bool = True
    threads: int = 1

    def context(self, out: Path) -> dict[str, Any]:
        """The point functions' context: pinned physics keys, and "_" run mechanics."""
        return {"model": self.model, "device": self.device, "periphery": self.periphery,
                "run_overrides": json.loads(json.dumps(dict(self.run_overrides or {}))),
                "_out_dir": str(out), "_re_mu": bool(self.re_mu), "_threads": int(self.threads)}


def run_device_sweep(
    out_dir: str | Path,
    options: SweepOptions,
    *,
    point_fn: PointFn = compare_point,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """`ept-hw sweep`: every point a short `compare`; tables, plots and requirements under `out_dir`.

    The base configuration (model preset + `run_overrides` + device + periphery) is checked before
    anything runs; its settings are pinned in the sweep manifest so a resume cannot mix bases.
    """
    o = options
    if not o.axes:
        raise ConfigError("axis", None, "at least one --axis NAME=v1,v2,...")
    for name in o.axes:
        if name not in AXES:
            raise ConfigError("axis", name, "one of " + ", ".join(AXES))
    check_range("tolerance", o.tolerance, 0.0)
    out = Path(out_dir).resolve()
    context = o.context(out)
    tile = base_tile(context)  # raises ConfigError on a bad model, device or override, before any work
    if tile.forward.is_perfect and set(o.axes) & set(PERIPHERY_AXES):
        raise ConfigError("axis", ", ".join(sorted(set(o.axes) & set(PERIPHERY_AXES))),
                          "an axis of the device (the base periphery is perfect: use --periphery default)")
    bases = base_values(tile)
    points = sweep_points(o.axes, grid=o.grid)
    if o.grid:
        points.insert(0, {})  # the base point: the device spec's device, periphery and loss curves
    records = run_sweep(point_fn, points, out, context=context, workers=o.workers, retry_failed=o.retry_failed,
                        on_record=on_record)
    names = list(o.axes)
    rows = sweep_rows(records, names, bases)
    reqs = derive_requirements(rows, names, o.tolerance, bases)
    csv_path, json_path = write_tables(rows, out, {
        "axes": {k: list(v) for k, v in o.axes.items()}, "tolerance": o.tolerance, "grid": o.grid,
        "base_values": {k: bases.get(k) for k in names}, "model": o.model, "device": o.device,
        "periphery": o.periphery, "requirements": [r.to_dict() for r in reqs],
    })
    plots = plot_gaps(rows, names, o.tolerance, out, bases)
    return SweepResult(out, rows, reqs, bases, csv_path, json_path, plots)
