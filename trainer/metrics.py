"""`metrics.jsonl`: one JSON object per logged step, the same keys for both paths.

Every row has exactly the keys of `empty_row()`; a figure that does not exist at that step (the
validation loss between evaluations, the estimator health between probes, the analog figures of a
single digital run) is `null`. Per-path figures carry the path as a prefix (`analog_`, `twin_`);
figures that compare the paths are per projection (`update_cos`, `weight_gap_per_projection`).
Non-finite floats are written as JSON's `NaN`/`Infinity` tokens (Python's `json` reads them), so a
diverged step is recorded as it was.

Each figure is declared once in `METRICS` (key, meaning, label, scope, how the report aggregates
it, which report plot draws it and how); the row schema (`row_keys()`), the report's final
figures (`final_figures`), its table (`figure_rows`) and its plots (`plotted`) derive from that
list, so a new metric is one `Metric(...)` line here plus the code that measures it (a
`StepOutcome` field of the same name, or a stabiliser's or probe's `figures`).

On resume the log is cut back to the checkpoint's step (rows logged after the last checkpoint by
the interrupted run are dropped), so the resumed rows follow on without duplicates. A torn last
line is dropped on read, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .files import atomic_write

__all__ = ["Metric", "METRICS", "PATHS", "PATH_KEYS", "ROW_KEYS", "keys_of", "row_keys", "empty_row", "MetricsLog",
           "read_metrics", "column", "final_figures", "figure_rows", "plotted", "aggregate", "active_paths"]

PATHS = ("analog", "twin")
SCOPES = ("common", "path", "cross", "health")


@dataclass(frozen=True)
class Metric:
    """One figure of `metrics.jsonl`, declared once: rows, the report's final-figures table and its
    plots derive from this list.

    `scope`: "common" (one per row), "path" (one per path, keyed `<path>_<key>`), "cross" (compares
    the paths), "health" (the twin's estimator health probe). `aggregate` says how the report's
    final figure is formed from the logged values ("last": the last logged value, "mean20": the
    mean of the last 20 finite values, "count": the number of rows where it is true); `figure` is
    that final figure's name and `figure_label` its label (default `label`). A metric with no
    `aggregate` is logged (and plotted if it names a `plot`) but has no final figure.

    Plotting (`experiments.report` draws every metric that names a `plot`): `plot` is the figure
    (`plots/<plot>.png`) and `panel` its panel, left to right; `scale` "log" makes the panel
    logarithmic; `style` "line", "points" (markers joined: sparse figures such as evaluations) or
    "dashed"; `smooth` a running mean over that many logged values; `legend` the series' name
    (default `label`; path-scoped series are prefixed by the path); `initial` the summary key of
    the per-path value before the first update, plotted at step −1 (`"initial_val_loss"`, or a
    dotted key such as `"initial_stability.re_mu"`: `summary[initial_stability][path][re_mu]`).
    A cross metric whose value is a per-projection mapping is drawn one series per projection.
    """

    key: str
    meaning: str
    label: str
    scope: str = "path"
    aggregate: str | None = None
    figure: str | None = None
    figure_label: str | None = None
    plot: str | None = None
    panel: int = 0
    scale: str = "linear"
    style: str = "line"
    smooth: int = 1
    legend: str | None = None
    initial: str | None = None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"metric {self.key}: scope {self.scope!r} is not one of {SCOPES}")
        if self.aggregate not in (None, "last", "mean20", "count"):
            raise ValueError(f"metric {self.key}: unknown aggregation {self.aggregate!r}")
        if self.scale not in ("linear", "log") or self.style not in ("line", "points", "dashed"):
            raise ValueError(f"metric {self.key}: scale {self.scale!r} / style {self.style!r}")

    @property
    def figure_name(self) -> str:
        return self.figure or self.key

    def row_keys(self) -> tuple[str, ...]:
        return tuple(f"{p}_{self.key}" for p in PATHS) if self.scope == "path" else (self.key,)


METRICS: tuple[Metric, ...] = (
    Metric("step", "0-based training step", "step", "common"),
    Metric("lr", "learning rate of the step (schedule applied)", "learning rate", "common"),
    Metric("wall_time", "seconds since the run started (resumes included)", "wall time (s)", "common"),
    Metric("loss", "training loss of the batch at the free-phase state (mean CE over tokens)", "train loss",
           aggregate="mean20", figure="train_loss_last20", figure_label="train loss, mean of last 20 logged steps",
           plot="loss", smooth=10, legend="train (10-step mean)"),
    Metric("val_loss", "validation loss (mean CE over the fixed validation batches), at evaluations",
           "validation loss (nats/token)", aggregate="last",
           plot="loss", style="points", legend="validation", initial="initial_val_loss"),
    Metric("residual", "free-phase residual used by the gate/controller (noise-aware on the Euler paths)",
           "free-phase residual (noise-aware)", aggregate="mean20", figure="residual_last20",
           figure_label="free-phase residual (noise-aware), last 20",
           plot="residual", scale="log", legend="residual (noise-aware)"),
    Metric("residual_raw", "last one-step residual of the free phase (analog: includes the read noise)",
           "raw one-step residual"),
    Metric("residual_floor", "one-step residual of read noise alone at the free-phase state (0 on the digital path)",
           "residual noise floor", aggregate="mean20", figure="residual_floor_last20",
           figure_label="residual noise floor, last 20", plot="residual", scale="log", style="dashed",
           legend="noise floor"),
    Metric("free_steps", "integrator steps of the free phase", "free-phase steps", aggregate="mean20",
           figure="free_steps_last20", figure_label="free-phase steps, last 20"),
    Metric("nudge_steps", "Euler steps of each nudged phase", "nudge steps"),
    Metric("gated", "the validity gate skipped the nudge at this step", "gated", aggregate="count",
           figure="gated_steps", figure_label="steps gated (nudge skipped)"),
    Metric("saturation", "fraction of devices at a bound (analog)", "device saturation fraction", aggregate="last"),
    Metric("pulses", "pulses applied so far, all arrays (analog)", "pulses applied", aggregate="last"),
    Metric("adc_conversions", "ADC conversions so far (analog)", "ADC conversions", aggregate="last"),
    Metric("adjoint_snr", "||a|| / spread of the adjoint over repeated nudges (analog health probe)",
           "adjoint SNR", aggregate="mean20", figure_label="adjoint SNR (mean of probes)"),
    Metric("jacreg_lambda", "jacreg weight λ used at this step", "jacreg λ", aggregate="last"),
    Metric("eigreg_penalty", "eigreg penalty at this step's free-phase state (before the update)",
           "eigreg penalty", aggregate="last", figure_label="eigreg penalty (digital assist on the analog path)"),
    Metric("resreg_cos", "analog health probe: cosine of the on-chip resreg (the arrays' reads at the window-mean "
           "state, window-averaged force) against the exact-weight resreg (read-out weights) at the same state, "
           "projection gradients", "resreg cos(on-chip, exact)", aggregate="mean20",
           figure_label="resreg cos(on-chip, exact weights), mean of probes"),
    Metric("resreg_norm_ratio", "analog health probe: ‖on-chip resreg‖/‖exact-weight resreg‖ at the same state",
           "resreg ‖on-chip‖/‖exact‖", aggregate="mean20",
           figure_label="resreg ‖on-chip‖/‖exact weights‖, mean of probes"),
    Metric("eigreg_abs_lambda", "eigreg's leading |λ| of I + εJ (subspace iteration, worst sample)", "eigreg |λ|"),
    # Leading eigenvalues at a validation operating point (ARPACK, `training.stability_every`); on
    # the analog path on the arrays' read-out weights (a digital copy), not through noisy reads.
    Metric("re_mu", "largest Re μ of J (μ < 0: the fixed point attracts)", "leading Re μ of J", aggregate="last",
           figure_label="leading Re μ of J (analog: read-out weights)",
           plot="stability", style="points", legend="leading Re μ", initial="initial_stability.re_mu"),
    Metric("im_mu", "|Im μ| of that eigenvalue (a pair crossing Re μ = 0 with Im ≠ 0: Hopf)", "|Im μ|",
           aggregate="last", figure_label="|Im μ| of that eigenvalue"),
    Metric("abs_lambda", "largest |λ| of the Euler map I + εJ", "largest |λ| of I + εJ", aggregate="last"),
    Metric("update_norm", "Frobenius norm of the applied projection updates lr·Σδuᵀ, all projections",
           "update norm"),
    Metric("realised_ratio", "per projection: ‖realised ΔW‖/‖requested ΔW‖ of the step on the analog path "
           "(realised = weights after − before the update, read exactly from the simulator state; requested = "
           "−lr·Σδuᵀ)", "realised/requested ‖ΔW‖", plot="realised_updates", scale="log", smooth=5),
    Metric("realised_cos", "per projection: cosine of the realised and the requested ΔW of the step (analog path, "
           "simulator-side)", "cos(realised, requested ΔW)"),
    Metric("saturation_per_projection", "per projection: fraction of devices at a bound (analog; at health probes "
           "and the last step)", "device saturation per projection"),
    Metric("update_cos", "per projection: cosine between the analog and the twin update", "update cosine", "cross",
           plot="update_cosine", smooth=5),
    Metric("weight_norm_ratio", "per projection: ‖W_analog‖/‖W_twin‖ (at health probes and the last step)",
           "analog/twin weight norm", "cross", plot="realised_updates", panel=1, style="points"),
    Metric("twin_out_of_range", "per projection: fraction of the twin's weights outside the analog arrays' "
           "representable range (mapping scale × the devices' bounds; at health probes and the last step)",
           "twin weights outside the analog range", "cross"),
    Metric("weight_gap", "‖W_analog − W_twin‖/‖W_twin‖ over all projections", "weight gap", "cross",
           plot="weight_gap", legend="all projections"),
    Metric("weight_gap_per_projection", "per projection: ‖W_analog − W_twin‖/‖W_twin‖", "weight gap per projection",
           "cross", plot="weight_gap"),
    Metric("health_cos", "cosine of the twin's EP gradient against the implicit gradient", "cos(EP, implicit)",
           "health", plot="estimator_health", style="points"),
    Metric("health_norm_ratio", "‖EP gradient‖/‖implicit gradient‖ on the twin", "‖EP‖/‖implicit‖", "health",
           plot="estimator_health", panel=1, scale="log", style="points"),
    Metric("health_self_coherence", "cosine between two half-batch EP estimates on the twin",
           "half-batch self-coherence", "health", plot="estimator_health", style="points"),
)

logger = logging.getLogger(__name__)


def keys_of(scope: str) -> tuple[str, ...]:
    """The declared keys of one scope ("path" keys are unprefixed), in declaration order."""
    return tuple(m.key for m in METRICS if m.scope == scope)


def row_keys() -> tuple[str, ...]:
    """Every key of a `metrics.jsonl` row: common, each path's (prefixed), cross, health."""
    return (keys_of("common") + tuple(f"{p}_{k}" for p in PATHS for k in keys_of("path"))
            + keys_of("cross") + keys_of("health"))


def __getattr__(name: str) -> tuple[str, ...]:
    # ROW_KEYS and PATH_KEYS are read from `METRICS` when asked for, never a stale copy of it
    if name == "ROW_KEYS":
        return row_keys()
    if name == "PATH_KEYS":
        return keys_of("path")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def empty_row(step: int) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in row_keys()}
    row["step"] = int(step)
    return row


class MetricsLog:
    """Appends rows to `path`; `resume_step` cuts rows with step > resume_step first."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if self.path.exists() else []
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = self.path.open("a")

    def append(self, row: Mapping[str, Any]) -> None:
        keys = row_keys()
        extra = set(row) - set(keys)
        missing = set(keys) - set(row)
        if extra or missing:
            raise KeyError(f"metrics row keys differ from the schema: extra {sorted(extra)}, missing {sorted(missing)}")
        self._fh.write(json.dumps({k: row[k] for k in keys}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics log. A torn last line (a crash while it was written) is dropped with a
    warning naming the file; an unreadable line before the last raises `ValueError` naming the
    file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if k == len(lines) - 1:
                logger.warning("%s: dropped a torn last line (line %d: %s)", path, i, exc)
                break
            raise ValueError(f"{path} line {i} is not a metrics row ({exc})") from exc
        rows.append(row)
    return rows


def column(rows: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows where `key` is not null."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if v is not None:
            steps.append(r["step"])
            values.append(v)
    return steps, values


def _finite_values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def aggregate(rows: Sequence[Mapping[str, Any]], key: str, how: str) -> Any:
    """A column's summary: "last" logged value, "mean20" (mean of the last 20 finite values), "count" (true rows)."""
    if how == "last":
        return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)
    if how == "mean20":
        vals = _finite_values([r for r in rows if r.get(key) is not None][-20:], key)
        return sum(vals) / len(vals) if vals else None
    if how == "count":
        return sum(1 for r in rows if r.get(key))
    raise ValueError(f"unknown aggregation {how!r}")


def active_paths(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The paths that logged a training loss."""
    return [p for p in PATHS if any(r.get(f"{p}_loss") is not None for r in rows)]


def final_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per active path: every declared final figure (`Metric.figure_name` -> its aggregate)."""
    return {p: {m.figure_name: aggregate(rows, f"{p}_{m.key}", m.aggregate)
                for m in METRICS if m.scope == "path" and m.aggregate}
            for p in active_paths(rows)}


def figure_rows() -> list[tuple[str, str]]:
    """(figure name, label) of every per-path final figure, in declaration order (the report table)."""
    return [(m.figure_name, m.figure_label or m.label) for m in METRICS if m.scope == "path" and m.aggregate]


def plotted() -> dict[str, dict[int, list[Metric]]]:
    """The report's plots as declared: figure name -> panel -> its metrics, in declaration order."""
    out: dict[str, dict[int, list[Metric]]] = {}
    for m in METRICS:
        if m.plot is not None:
            out.setdefault(m.plot, {}).setdefault(m.panel, []).append(m)
    return out
