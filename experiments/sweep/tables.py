"""Sweep tables and plots: flat rows (`sweep.csv`, `sweep.json`), one-axis slices, gap plots."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .axes import AXES
from .engine import atomic_write_json

__all__ = ["ROW_COLUMNS", "sweep_rows", "write_tables", "axis_slice", "plot_gaps", "finite_number"]

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
    atomic_write_json(json_path, {**dict(extra or {}), "rows": list(rows)})
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


def finite_number(x: Any) -> bool:
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
        gaps = [sl[i]["gap"] if finite_number(sl[i].get("gap")) else math.nan for i in order]
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

