"""Device tolerance sweeps: run a point function over device/periphery axes, derive requirements.

The engine is generic over a *point function* ``point_fn(overrides, context) -> dict`` (a
module-level function, so that spawned worker processes can import it):

- axes are parsed from ``NAME=v1,v2,...`` (`parse_axis`); by default one axis at a time around the
  base (the base point itself plus every value of every axis with the other axes left at the
  base), or the full grid on request (`sweep_points`);
- every point has a stable id, a hash of its overrides (`point_id`);
- points run in worker processes (`concurrent.futures.ProcessPoolExecutor`, spawn context) or
  inline for ``workers=1``; each point's record is written atomically (temp file, fsync, rename)
  to ``points/<id>.json`` as soon as it finishes, so an interrupted sweep resumes without
  recomputing finished points, and a point that raises is recorded with its error while the rest
  go on (`run_sweep`);
- `write_tables` writes ``sweep.csv`` / ``sweep.json`` (one row per point), `plot_gaps` the gap
  against each axis, `derive_requirements` the weakest passing value per axis.

The axes of issue 7 and the configuration fields they override are listed in `AXES` (see
`axis_table`); `compare_point` is the point function that runs a short analog/twin `compare`.

Gap convention: gap = analog − twin final validation loss (nats); a point passes when
gap <= tolerance (an analog path that ends *better* than its twin passes).
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from crossbar.io import bits_from_res, res_from_bits
from ept_hw.config import ConfigError

__all__ = [
    "AxisSpec",
    "AXES",
    "axis_table",
    "parse_axis",
    "sweep_points",
    "point_id",
    "PointFn",
    "RESULT_KEYS",
    "run_sweep",
    "load_records",
    "sweep_rows",
    "write_tables",
    "plot_gaps",
    "Requirement",
    "derive_requirements",
    "axis_slice",
    "apply_overrides",
    "base_values",
    "bits_to_res",
    "res_to_bits",
]

logger = logging.getLogger(__name__)

PointFn = Callable[[Mapping[str, Any], Mapping[str, Any]], Mapping[str, Any]]

#: Figures a point function may return (missing ones are recorded as null).
RESULT_KEYS = (
    "analog_val_loss",
    "twin_val_loss",
    "gap",
    "analog_residual",
    "twin_residual",
    "re_mu",
    "pulses_per_device",
    "analog_diverged",
    "run_dir",
)

POINTS_DIR = "points"
MANIFEST = "sweep_manifest.json"


# --------------------------------------------------------------------------------------------
# Axes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxisSpec:
    """One sweep axis: how its values are typed, which way is "weaker", what it overrides.

    `stronger` says which values demand more of the hardware: "higher" (more bits, more states,
    more reads), "lower" (less noise, less variation), "abs_lower" (|asymmetry| smaller), or
    "ordered" with `choices` listed from the least to the most demanding. The *weakest* value is
    the least demanding one.
    """

    name: str
    kind: str  # "int" | "float" | "choice"
    stronger: str  # "higher" | "lower" | "abs_lower" | "ordered"
    unit: str
    meaning: str
    target: str  # the configuration field(s) the value overrides (documentation and spec export)
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.kind == "choice":
            text = ALGORITHM_ALIASES.get(text, text) if self.name == "algorithm" else text
            if text not in self.choices:
                raise ConfigError(f"axis {self.name}", text, "one of " + ", ".join(self.choices))
            return text
        try:
            value: Any = int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise ConfigError(f"axis {self.name}", text, f"a {self.kind}") from None
        if self.kind == "float" and not math.isfinite(value):
            raise ConfigError(f"axis {self.name}", text, "a finite number")
        if self.minimum is not None and value < self.minimum:
            raise ConfigError(f"axis {self.name}", value, f"a number >= {self.minimum:g}")
        return value

    def strength(self, value: Any) -> float:
        """A number that grows with how demanding `value` is for the hardware."""
        if self.stronger == "higher":
            return float(value)
        if self.stronger == "lower":
            return -float(value)
        if self.stronger == "abs_lower":
            return -abs(float(value))
        if self.stronger == "ordered":
            return float(self.choices.index(value))
        raise ValueError(f"unknown direction {self.stronger!r}")

    @property
    def weaker_means(self) -> str:
        return {
            "higher": "lower value",
            "lower": "higher value",
            "abs_lower": "larger magnitude",
            "ordered": "earlier in " + " < ".join(self.choices),
        }[self.stronger]


#: The update algorithms (crossbar's names) from the least to the most demanding periphery: plain
#: SGD ("sgd") needs nothing beyond the array; Tiki-Taka v2 ("ttv2") a second (fast) array and a
#: digital buffer of the columns being transferred; mixed precision a digital accumulator per weight.
ALGORITHMS = ("sgd", "ttv2", "mixed_precision")
ALGORITHM_ALIASES = {"plain": "sgd", "tiki_taka_v2": "ttv2", "tiki_taka": "ttv2", "tt_v2": "ttv2", "mp": "mixed_precision"}

AXES: dict[str, AxisSpec] = {
    a.name: a
    for a in (
        AxisSpec("n_states", "int", "higher", "states",
                 "number of device states (w_max - w_min)/granularity",
                 "tile.device.dw_min scaled so that (w_max - w_min)/granularity = n_states", minimum=2),
        AxisSpec("up_down", "float", "abs_lower", "1",
                 "up/down asymmetry: up step dw_min(1 + up_down), down step dw_min(1 - up_down)",
                 "tile.device.up_down"),
        AxisSpec("c2c", "float", "lower", "fraction of dw_min",
                 "cycle-to-cycle (pulse-to-pulse) step noise", "tile.device.dw_min_std", minimum=0),
        AxisSpec("d2d", "float", "lower", "fraction (relative std)",
                 "device-to-device variation of step size and bounds",
                 "tile.device.dw_min_dtod = w_max_dtod = w_min_dtod", minimum=0),
        AxisSpec("dac_bits", "int", "higher", "bits", "DAC resolution of the inputs (forward and transposed reads)",
                 "tile.forward.inp_res = tile.backward.inp_res = 1/(2^bits - 2)", minimum=2),
        AxisSpec("adc_bits", "int", "higher", "bits", "ADC resolution of the outputs (forward and transposed reads)",
                 "tile.forward.out_res = tile.backward.out_res = 1/(2^bits - 2)", minimum=2),
        AxisSpec("read_noise", "float", "lower", "tile output units (std)",
                 "additive output (read) noise per MVM", "tile.forward.out_noise = tile.backward.out_noise",
                 minimum=0),
        AxisSpec("reads_averaged", "int", "higher", "reads", "reads averaged per MVM",
                 "analog.read_average (the trainer sets tile.n_reads from it)",
                 minimum=1),
        AxisSpec("pulse_length", "int", "higher", "pulses", "update pulse-train length BL",
                 "tile.update.desired_bl", minimum=1),
        AxisSpec("algorithm", "choice", "ordered", "-", "update algorithm (sgd = plain, ttv2 = Tiki-Taka v2)",
                 "tile.algorithm", choices=ALGORITHMS),
    )
}


# one home for bits <-> resolution: crossbar.io (aihwkit's convention, 2^bits - 2 steps)
bits_to_res = res_from_bits
res_to_bits = bits_from_res


def apply_overrides(tile: Any, overrides: Mapping[str, Any]) -> Any:
    """The `crossbar.config.TileConfig` with the axis values of `overrides` applied (validated again).

    Device axes rewrite the tile's device table (aihwkit names); periphery axes set the same value
    on the forward and the transposed (backward) read. Unknown axis names raise `ConfigError`.
    """
    import dataclasses

    device = tile.device_config()
    dev_changes: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    fwd: dict[str, Any] = {}
    upd: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in AXES:
            raise ConfigError("axis", name, "one of " + ", ".join(AXES))
        if name == "n_states":
            if device.is_ideal:
                raise ConfigError("axis n_states", value, "a pulsed device (the ideal device has no states)")
            # granularity is proportional to dw_min for every model, so scale dw_min to hit n_states
            target = (device.w_max - device.w_min) / float(value)
            dev_changes["dw_min"] = device.dw_min * target / device.granularity
        elif name == "up_down":
            dev_changes["up_down"] = float(value)
        elif name == "c2c":
            dev_changes["dw_min_std"] = float(value)
        elif name == "d2d":
            dev_changes.update(dw_min_dtod=float(value), w_max_dtod=float(value), w_min_dtod=float(value))
        elif name == "dac_bits":
            fwd["inp_res"] = bits_to_res(int(value))
        elif name == "adc_bits":
            fwd["out_res"] = bits_to_res(int(value))
        elif name == "read_noise":
            fwd["out_noise"] = float(value)
        elif name == "reads_averaged":
            changes["n_reads"] = int(value)
        elif name == "pulse_length":
            upd["desired_bl"] = int(value)
        elif name == "algorithm":
            changes["algorithm"] = ALGORITHM_ALIASES.get(value, value)
    if dev_changes:
        if device.is_ideal:
            raise ConfigError("axis " + ", ".join(sorted(set(overrides) & {"up_down", "c2c", "d2d"})), "ideal",
                              "a pulsed device (the ideal device has no pulse parameters)")
        changes["device"] = device.replace(**dev_changes).to_dict()
    if fwd:
        changes["forward"] = dataclasses.replace(tile.forward, **fwd)
        changes["backward"] = dataclasses.replace(tile.backward, **fwd)
    if upd:
        changes["update"] = dataclasses.replace(tile.update, **upd)
    return dataclasses.replace(tile, **changes) if changes else tile


def base_values(tile: Any) -> dict[str, Any]:
    """Every axis's value in the base tile (None where it does not apply, e.g. bits of perfect periphery)."""
    device = tile.device_config()
    out: dict[str, Any] = dict.fromkeys(AXES)
    if not device.is_ideal:
        g = device.granularity
        out["n_states"] = int(round((device.w_max - device.w_min) / g)) if g > 0 else None
        out["up_down"] = device.up_down
        out["c2c"] = device.dw_min_std
        out["d2d"] = device.dw_min_dtod
    if not tile.forward.is_perfect:
        dac, adc = res_to_bits(tile.forward.inp_res), res_to_bits(tile.forward.out_res)
        out["dac_bits"] = None if dac is None else int(round(dac))
        out["adc_bits"] = None if adc is None else int(round(adc))
        out["read_noise"] = tile.forward.out_noise
    out["reads_averaged"] = tile.n_reads
    out["pulse_length"] = tile.update.desired_bl
    out["algorithm"] = tile.algorithm
    return out


def axis_table() -> str:
    """The axes and the configuration fields they override, as a Markdown table."""
    lines = ["| axis | meaning | unit | overrides | weaker = |", "|---|---|---|---|---|"]
    for a in AXES.values():
        lines.append(f"| `{a.name}` | {a.meaning} | {a.unit} | `{a.target}` | {a.weaker_means} |")
    return "\n".join(lines)


def parse_axis(text: str) -> tuple[str, tuple[Any, ...]]:
    """``"adc_bits=2,4,8"`` -> ``("adc_bits", (2, 4, 8))``; unknown names and bad values raise `ConfigError`."""
    if "=" not in text:
        raise ConfigError("axis", text, "NAME=v1,v2,... with NAME one of " + ", ".join(AXES))
    name, _, values_text = text.partition("=")
    name = name.strip()
    if name not in AXES:
        raise ConfigError("axis", name, "one of " + ", ".join(AXES))
    parts = [p for p in values_text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"axis {name}", values_text, "at least one value")
    spec = AXES[name]
    values: list[Any] = []
    for p in parts:
        v = spec.parse(p)
        if v not in values:
            values.append(v)
    return name, tuple(values)


def sweep_points(axes: Mapping[str, Sequence[Any]], grid: bool = False, include_base: bool = True) -> list[dict[str, Any]]:
    """The overrides of every point.

    One axis at a time (default): the base point ``{}`` and ``{name: value}`` for every value of
    every axis. Grid: the Cartesian product of all axes (every point overrides every axis).
    """
    if grid:
        points: list[dict[str, Any]] = [{}]
        for name, values in axes.items():
            points = [dict(p, **{name: v}) for p in points for v in values]
        return points
    points = [{}] if include_base else []
    for name, values in axes.items():
        points.extend({name: v} for v in values)
    return points


def point_id(overrides: Mapping[str, Any]) -> str:
    """A stable id of a point: a hash of its overrides (order of keys does not matter)."""
    blob = json.dumps(dict(overrides), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, allow_nan=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _run_point(point_fn: PointFn, overrides: dict[str, Any], context: dict[str, Any], path: str) -> dict[str, Any]:
    """Run one point (in a worker or inline), write its record atomically, return it."""
    start = time.perf_counter()
    record: dict[str, Any] = {"point_id": point_id(overrides), "overrides": overrides}
    try:
        result = dict(point_fn(overrides, context))
        record.update({k: result.get(k) for k in RESULT_KEYS})
        record.update({k: v for k, v in result.items() if k not in RESULT_KEYS})
        if "gap" not in result and record.get("analog_val_loss") is not None and record.get("twin_val_loss") is not None:
            record["gap"] = float(record["analog_val_loss"]) - float(record["twin_val_loss"])
        record["status"] = "ok"
        record["error"] = None
    except Exception as exc:  # noqa: BLE001 - a failed point is data: record it, the sweep goes on
        record.update({k: None for k in RESULT_KEYS})
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record["wall_time"] = time.perf_counter() - start
    _atomic_write_json(Path(path), record)
    return record


def load_records(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every finished point record under ``out_dir/points``, by point id (unreadable files skipped)."""
    points_dir = Path(out_dir) / POINTS_DIR
    records: dict[str, dict[str, Any]] = {}
    if not points_dir.is_dir():
        return records
    for path in sorted(points_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable point record %s (it will be recomputed)", path)
            continue
        if isinstance(record, dict) and record.get("point_id") == path.stem:
            records[path.stem] = record
    return records


def _check_manifest(out_dir: Path, context: Mapping[str, Any]) -> None:
    """A sweep directory belongs to one base (context); resuming with another base is refused."""
    path = out_dir / MANIFEST
    # keys starting with "_" are run mechanics (where, how many threads), not the physics of a point
    fresh = json.loads(json.dumps({k: v for k, v in context.items() if not k.startswith("_")}, sort_keys=True, default=str))
    if path.is_file():
        old = json.loads(path.read_text()).get("context", {})
        differing = sorted(k for k in set(old) | set(fresh) if old.get(k) != fresh.get(k))
        if differing:
            raise ValueError(
                f"sweep directory {out_dir} holds points of a different base; differing keys: "
                + ", ".join(differing) + " (use another --out, or the same settings to resume)"
            )
    else:
        _atomic_write_json(path, {"context": fresh})


def run_sweep(
    point_fn: PointFn,
    points: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    context: Mapping[str, Any] | None = None,
    workers: int = 1,
    retry_failed: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point not already finished under `out_dir`; return all records in point order.

    Points with a record on disk are not recomputed (failed ones only with `retry_failed`).
    `workers > 1` runs points in spawned worker processes; `workers = 1` runs them in this
    process. `context` (JSON-able) is passed to every call and pinned in ``sweep_manifest.json``:
    resuming a directory with a different context raises `ValueError` naming the differing keys
    (keys starting with "_" are passed but not pinned: run mechanics such as threads).
    """
    if workers < 1:
        raise ConfigError("workers", workers, "an integer >= 1")
    out = Path(out_dir)
    (out / POINTS_DIR).mkdir(parents=True, exist_ok=True)
    ctx = dict(context or {})
    _check_manifest(out, ctx)
    ordered: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in points:
        pid = point_id(p)
        if pid not in seen:
            seen.add(pid)
            ordered.append(dict(p))
    done = load_records(out)
    todo = [
        p for p in ordered
        if point_id(p) not in done or (retry_failed and done[point_id(p)].get("status") != "ok")
    ]
    logger.info("sweep %s: %d points, %d finished, %d to run", out, len(ordered), len(ordered) - len(todo), len(todo))

    def record_path(p: Mapping[str, Any]) -> str:
        return str(out / POINTS_DIR / f"{point_id(p)}.json")

    def finish(record: dict[str, Any]) -> None:
        done[record["point_id"]] = record
        if on_record is not None:
            on_record(record)

    if workers == 1 or len(todo) <= 1:
        for p in todo:
            finish(_run_point(point_fn, p, ctx, record_path(p)))
    else:
        mp = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp) as pool:
            futures = {pool.submit(_run_point, point_fn, p, ctx, record_path(p)): p for p in todo}
            try:
                for fut in cf.as_completed(futures):
                    p = futures[fut]
                    try:
                        record = fut.result()
                    except Exception as exc:  # noqa: BLE001 - the worker process itself died
                        record = {"point_id": point_id(p), "overrides": p, "status": "failed",
                                  "error": f"worker process failed: {type(exc).__name__}: {exc}",
                                  "wall_time": None, **{k: None for k in RESULT_KEYS}}
                        _atomic_write_json(Path(record_path(p)), record)
                    finish(record)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    return [done[point_id(p)] for p in ordered if point_id(p) in done]


# --------------------------------------------------------------------------------------------
# Tables and plots
# --------------------------------------------------------------------------------------------

ROW_COLUMNS = (
    "point_id", "status", "analog_val_loss", "twin_val_loss", "gap", "analog_residual", "twin_residual",
    "re_mu", "pulses_per_device", "analog_diverged", "wall_time", "error", "run_dir",
)


def sweep_rows(records: Sequence[Mapping[str, Any]], axis_names: Sequence[str],
               base_values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One flat row per point: every axis's value (the base value, or null, where not overridden)."""
    base_values = dict(base_values or {})
    rows = []
    for r in records:
        over = r.get("overrides", {})
        row: dict[str, Any] = {"point_id": r.get("point_id"), "status": r.get("status")}
        for name in axis_names:
            row[name] = over.get(name, base_values.get(name))
        row["overrides"] = ";".join(f"{k}={v}" for k, v in sorted(over.items())) or "base"
        for k in ROW_COLUMNS[2:]:
            row[k] = r.get(k)
        rows.append(row)
    return rows


def write_tables(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """``sweep.csv`` (one row per point) and ``sweep.json`` (the rows plus `extra`, e.g. axes and tolerance)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    csv_path = out / "sweep.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, csv_path)
    json_path = out / "sweep.json"
    _atomic_write_json(json_path, {**dict(extra or {}), "rows": list(rows)})
    return csv_path, json_path


def axis_slice(rows: Sequence[Mapping[str, Any]], axis: str, axis_names: Sequence[str],
               base_values: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
    """The rows that vary `axis` with every other axis at the base.

    A row's value of another axis counts as "at the base" when it equals the base value, or when
    it is null (not overridden, base value unknown). Rows whose own `axis` value is unknown (the
    base point without a known base value) are left out.
    """
    base_values = dict(base_values or {})
    out = []
    for r in rows:
        if r.get(axis) is None:
            continue
        others_at_base = all(
            r.get(b) is None or (b in base_values and r.get(b) == base_values[b])
            for b in axis_names if b != axis
        )
        if others_at_base:
            out.append(r)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_gaps(rows: Sequence[Mapping[str, Any]], axis_names: Sequence[str], tolerance: float, out_dir: str | Path,
              base_values: Mapping[str, Any] | None = None) -> list[Path]:
    """``plots/gap_vs_<axis>.png`` for every axis: the gap of the one-axis slice, with the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in axis_names:
        spec = AXES[name]
        sl = [r for r in axis_slice(rows, name, axis_names, base_values) if r.get("status") == "ok"]
        if not sl:
            continue
        if spec.kind == "choice":
            xs_all = [spec.choices.index(r[name]) for r in sl]
        else:
            xs_all = [float(r[name]) for r in sl]
        order = sorted(range(len(sl)), key=lambda i: xs_all[i])
        xs = [xs_all[i] for i in order]
        gaps = [sl[i]["gap"] if _finite(sl[i].get("gap")) else math.nan for i in order]
        fig, ax = plt.subplots(figsize=(5.0, 3.4))
        finite = [g for g in gaps if math.isfinite(g)]
        ax.plot(xs, gaps, "o-", color="tab:red", label="analog − twin val loss")
        diverged = [x for x, g in zip(xs, gaps) if not math.isfinite(g)]
        if diverged:  # no loss to plot: mark them above every finite gap
            top = max(finite + [tolerance, 0.0]) * 1.15 + 1e-3
            ax.plot(diverged, [top] * len(diverged), "x", color="black", ms=9, mew=2, label="diverged (no gap)")
        ax.axhline(tolerance, color="tab:green", ls="--", label=f"tolerance {tolerance:g}")
        ax.axhline(0.0, color="0.7", lw=0.8)
        base = (base_values or {}).get(name)
        if base is not None:
            bx = spec.choices.index(base) if spec.kind == "choice" else float(base)
            ax.axvline(bx, color="0.5", ls=":", lw=1, label=f"base {base}")
        if spec.kind == "choice":
            ax.set_xticks(range(len(spec.choices)), spec.choices)
        elif all(x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(f"{name} [{spec.unit}]")
        ax.set_ylabel("gap [nats]")
        ax.set_title(f"gap vs {name}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = plot_dir / f"gap_vs_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Requirements
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """The weakest value of one axis that keeps the gap within the tolerance (other axes at base).

    `required` is the least demanding tested value v such that v and every more demanding tested
    value pass (so "at least as good as v" is backed by every tested point); None when the most
    demanding tested value fails. `non_monotone` flags a less demanding value that passed on its
    own below a failing one (noise in the sweep: read the gaps). Points that raised are listed in
    `failed_values` and neither pass nor fail.
    """

    axis: str
    unit: str
    direction: str
    target: str
    tolerance: float
    required: Any
    status: str  # "met" | "not_met" | "no_data"
    tested: tuple[tuple[Any, float | None], ...] = field(default_factory=tuple)  # (value, gap), weakest first
    failed_values: tuple[Any, ...] = ()
    non_monotone: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis, "unit": self.unit, "meaning": AXES[self.axis].meaning if self.axis in AXES else "",
            "weaker_means": self.direction, "overrides": self.target,
            "tolerance": self.tolerance, "required": self.required, "status": self.status,
            "tested": [{"value": v, "gap": g} for v, g in self.tested],
            "failed_values": list(self.failed_values), "non_monotone": self.non_monotone,
        }


def derive_requirements(rows: Sequence[Mapping[str, Any]], axis_names: Sequence[str], tolerance: float,
                        base_values: Mapping[str, Any] | None = None) -> list[Requirement]:
    """Per axis, the weakest value whose gap (and that of every stronger tested value) is <= tolerance.

    `rows` are flat sweep rows (`sweep_rows`): each has the axis values, ``status`` and ``gap``. A
    point with status "ok" and a non-finite or missing gap (the analog path diverged) fails. When
    one value was measured more than once the worst gap counts.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)):
        raise ConfigError("tolerance", tolerance, "a finite number (nats)")
    reqs = []
    for name in axis_names:
        spec = AXES[name]
        gaps: dict[Any, float] = {}
        failed: list[Any] = []
        for r in axis_slice(rows, name, axis_names, base_values):
            v = r[name]
            if r.get("status") != "ok":
                if v not in failed:
                    failed.append(v)
                continue
            g = float(r["gap"]) if _finite(r.get("gap")) else math.inf
            gaps[v] = max(gaps.get(v, -math.inf), g)
        failed = [v for v in failed if v not in gaps]
        values = sorted(gaps, key=spec.strength)  # weakest first
        tested = tuple((v, gaps[v] if math.isfinite(gaps[v]) else None) for v in values)
        if not values:
            reqs.append(Requirement(name, spec.unit, spec.weaker_means, spec.target, float(tolerance), None,
                                    "no_data", tested, tuple(failed)))
            continue
        required = None
        for v in reversed(values):  # from the most demanding down, while every value passes
            if gaps[v] <= tolerance:
                required = v
            else:
                break
        weaker = values[: values.index(required)] if required is not None else values
        non_monotone = any(gaps[v] <= tolerance for v in weaker)
        reqs.append(Requirement(name, spec.unit, spec.weaker_means, spec.target, float(tolerance), required,
                                "met" if required is not None else "not_met", tested, tuple(failed), non_monotone))
    return reqs


# --------------------------------------------------------------------------------------------
# The compare point function and the device sweep
# --------------------------------------------------------------------------------------------

PERIPHERY_AXES = ("dac_bits", "adc_bits", "read_noise")


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
    analog = {"device": str(tile_path.resolve()), "periphery": "default"}
    if "reads_averaged" in overrides:
        analog["read_average"] = int(overrides["reads_averaged"])
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
    from .spec import checkpoint_pulse_counts

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


def run_device_sweep(
    out_dir: str | Path,
    *,
    model: str,
    device: str,
    axes: Mapping[str, Sequence[Any]],
    tolerance: float = 0.05,
    grid: bool = False,
    workers: int = 1,
    periphery: str = "default",
    run_overrides: Mapping[str, Any] | None = None,
    retry_failed: bool = False,
    re_mu: bool = True,
    threads: int = 1,
    point_fn: PointFn = compare_point,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """`ept-hw sweep`: every point a short `compare`; tables, plots and requirements under `out_dir`.

    The base configuration (model preset + `run_overrides` + device + periphery) is checked before
    anything runs; its settings are pinned in the sweep manifest so a resume cannot mix bases.
    """
    from ept_hw.config import check_range

    if not axes:
        raise ConfigError("axis", None, "at least one --axis NAME=v1,v2,...")
    for name in axes:
        if name not in AXES:
            raise ConfigError("axis", name, "one of " + ", ".join(AXES))
    check_range("tolerance", tolerance, 0.0)
    out = Path(out_dir).resolve()
    context = {"model": model, "device": device, "periphery": periphery,
               "run_overrides": json.loads(json.dumps(dict(run_overrides or {}))),
               "_out_dir": str(out), "_re_mu": bool(re_mu), "_threads": int(threads)}
    tile = base_tile(context)  # raises ConfigError on a bad model, device or override, before any work
    if tile.forward.is_perfect and set(axes) & set(PERIPHERY_AXES):
        raise ConfigError("axis", ", ".join(sorted(set(axes) & set(PERIPHERY_AXES))),
                          "an axis of the device (the base periphery is perfect: use --periphery default)")
    bases = base_values(tile)
    points = sweep_points(axes, grid=grid)
    if grid:
        points.insert(0, {})  # the base point: the device spec's device, periphery and loss curves
    records = run_sweep(point_fn, points, out, context=context, workers=workers, retry_failed=retry_failed,
                        on_record=on_record)
    names = list(axes)
    rows = sweep_rows(records, names, bases)
    reqs = derive_requirements(rows, names, tolerance, bases)
    csv_path, json_path = write_tables(rows, out, {
        "axes": {k: list(v) for k, v in axes.items()}, "tolerance": tolerance, "grid": grid,
        "base_values": {k: bases.get(k) for k in names}, "model": model, "device": device, "periphery": periphery,
        "requirements": [r.to_dict() for r in reqs],
    })
    plots = plot_gaps(rows, names, tolerance, out, bases)
    return SweepResult(out, rows, reqs, bases, csv_path, json_path, plots)
