"""Device tolerance sweeps, split by job.

- `axes`: the axis registry (each axis with its own apply rule and base-value reader), parsing,
  points and point ids;
- `engine`: the point-function engine (local process pool or Ray tasks, per-task atomic records,
  resume);
- `tables`: flat rows, `sweep.csv`/`sweep.json`, one-axis slices, gap plots;
- `stats`: paired-gap statistics over seeds and degenerate-point detection;
- `requirements`: the requirement of each axis from the rows (the decision rule);
- `device`: the device sweep itself (`compare_point`, `SweepOptions`, `run_device_sweep`).

Gap convention: gap = analog − twin final validation loss (nats).
"""

from .axes import (
    ALGORITHM_ALIASES, ALGORITHMS, AXES, PERIPHERY_AXES, AxisSpec, TileEdit, apply_overrides,
    axis_table, base_values, bits_to_res, parse_axis, point_id, res_to_bits, sweep_points,
)
from .device import SEED_STRIDE, SweepOptions, SweepResult, base_tile, compare_point, leading_re_mu, run_device_sweep
from .engine import (
    BACKENDS, MANIFEST, POINTS_DIR, RESULT_KEYS, PointFn, SweepBackendError, Task, atomic_write_json, check_backend,
    load_records, run_sweep,
)
from .requirements import TWIN_MARGIN, Requirement, TestedValue, decide_value, derive_requirements
from .stats import COSINE_FLOOR, DEAD_FRACTION, GapStats, degenerate_reasons, gap_stats, point_status
from .tables import ROW_COLUMNS, axis_slice, plot_gaps, sweep_rows, write_tables

__all__ = [
    "AxisSpec", "TileEdit", "AXES", "ALGORITHMS", "ALGORITHM_ALIASES", "PERIPHERY_AXES", "axis_table", "parse_axis",
    "sweep_points", "point_id", "apply_overrides", "base_values", "bits_to_res", "res_to_bits",
    "PointFn", "RESULT_KEYS", "POINTS_DIR", "MANIFEST", "Task", "run_sweep", "load_records", "atomic_write_json",
    "ROW_COLUMNS", "sweep_rows", "write_tables", "axis_slice", "plot_gaps", "Requirement", "derive_requirements",
    "SweepOptions", "SweepResult", "run_device_sweep", "compare_point", "base_tile", "leading_re_mu", "SEED_STRIDE",
    "TWIN_MARGIN", "TestedValue", "decide_value", "COSINE_FLOOR", "DEAD_FRACTION", "GapStats", "degenerate_reasons",
    "gap_stats", "point_status", "BACKENDS", "SweepBackendError", "check_backend",
]
