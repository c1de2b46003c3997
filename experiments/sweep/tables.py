"""Sweep tables and plots: flat rows (`sweep.csv`, `sweep.json`), one-axis slices, gap plots."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from trainer.rundir import atomic_write

from .axes import AXES
from .engine import atomic_write_json
from .stats import gap_stats, point_status

__all__ = ["MEAN_COLUMNS", "ROW_COLUMNS", "sweep_rows", "write_tables", "axis_slice", "plot_gaps", "finite_number"]

#: Per-seed figures averaged into a point's row (mean over the seeds that have them).
MEAN_COLUMNS = ("analog_val_loss", "twin_val_loss", "analog_residual", "twin_residual", "re_mu",
                "pulses_per_device", "update_cos_mean", "unigram_entropy")

ROW_COLUMNS = (
    "point_id", "status", "n_seeds", "gap", "gap_se", "gap_lo", "gap_hi", "gap_upper", "gap_lower", "gaps",
    *MEAN_COLUMNS, "steps", "analog_diverged", "degenerate", "wall_time", "error", "run_dir",
)


def sweep_rows(records: Sequence[Mapping[str, Any]], axis_names: Sequence[str],
               base_values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One flat row per point (its seeds' records together): every axis's value (the base value, or
    null, where not overridden), the status (`stats.point_status`), the paired gap's mean, standard
    error and 95 % bounds over seeds (`stats.gap_stats`), and the mean of the other figures."""
    base_values = dict(base_values or {})
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get("point_id")), []).append(r)
    rows = []
    for pid, recs in groups.items():
        recs = sorted(recs, key=lambda r: r.get("seed_index") or 0)
        over = recs[0].get("overrides", {})
        status, reasons = point_status(recs)
        row: dict[str, Any] = {"point_id": pid, "status": status}
        for name in axis_names:
            row[name] = over.get(name, base_values.get(name))
        row["overrides"] = ";".join(f"{k}={v}" for k, v in sorted(over.items())) or "base"
        ok = [r for r in recs if r.get("status") == "ok"]
        gaps = [r.get("gap") if finite_number(r.get("gap")) else None for r in ok]
        row.update(gap_stats([g for g in gaps if g is not None]).to_dict())
        row["gaps"] = gaps
        for k in MEAN_COLUMNS:
            vals = [float(r[k]) for r in ok if finite_number(r.get(k))]
            row[k] = sum(vals) / len(vals) if vals else None
        row["steps"] = min((int(r["steps"]) for r in ok if r.get("steps") is not None), default=None)
        row["analog_diverged"] = any(bool(r.get("analog_diverged")) for r in recs)
        row["degenerate"] = "; ".join(reasons) if status in ("degenerate", "diverged") else None
        walls = [float(r["wall_time"]) for r in recs if finite_number(r.get("wall_time"))]
        row["wall_time"] = sum(walls) if walls else None
        row["error"] = next((r.get("error") for r in recs if r.get("error")), None)
        row["run_dir"] = next((r.get("run_dir") for r in recs if r.get("run_dir")), None)
        row["seeds"] = [r.get("seed_index") for r in recs]
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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r.get(k)) for k in columns})
    atomic_write(csv_path, text.getvalue())
    json_path = out / "sweep.json"
    atomic_write_json(json_path, {**dict(extra or {}), "rows": list(rows)})
    return csv_path, json_path


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join("" if v is None else str(v) for v in value)
    return value


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
    """``plots/gap_vs_<axis>.png`` for every axis: the mean paired gap of the one-axis slice with its
    95 % interval (error bars, where there are two seeds or more), the tolerance, and the points
    that cannot pass marked: degenerate (open square at its gap), diverged (x above every gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in axis_names:
        spec = AXES[name]
        sl = [r for r in axis_slice(rows, name, axis_names, base_values)
              if r.get("status") in ("ok", "degenerate", "diverged")]
        if not sl:
            continue
        xs_all = [spec.choices.index(r[name]) if spec.kind == "choice" else float(r[name]) for r in sl]
        order = sorted(range(len(sl)), key=lambda i: xs_all[i])
        xs = [xs_all[i] for i in order]
        pts = [sl[i] for i in order]
        gaps = [r["gap"] if finite_number(r.get("gap")) else math.nan for r in pts]
        fig, ax = plt.subplots(figsize=(5.0, 3.4))
        finite = [g for g in gaps if math.isfinite(g)]
        ax.plot(xs, gaps, "-", color="tab:red", alpha=0.5)
        ok = [i for i, r in enumerate(pts) if r.get("status") == "ok" and math.isfinite(gaps[i])]
        if ok:
            lo = [gaps[i] - pts[i]["gap_lo"] if finite_number(pts[i].get("gap_lo")) else 0.0 for i in ok]
            hi = [pts[i]["gap_hi"] - gaps[i] if finite_number(pts[i].get("gap_hi")) else 0.0 for i in ok]
            n = max(int(pts[i].get("n_seeds") or 1) for i in ok)
            ax.errorbar([xs[i] for i in ok], [gaps[i] for i in ok], yerr=[lo, hi], fmt="o", color="tab:red",
                        capsize=3, label=f"analog − twin val loss (mean, 95 % interval, {n} seeds)")
        dg = [i for i, r in enumerate(pts) if r.get("status") == "degenerate" and math.isfinite(gaps[i])]
        if dg:
            ax.plot([xs[i] for i in dg], [gaps[i] for i in dg], "s", mfc="none", mec="black", ms=9, mew=1.5,
                    label="degenerate (never passes)")
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
