"""Run report: PNG plots and `report.md` from a run directory (`config.toml`, `metrics.jsonl`,
`summary.json`, `conductances.pt`).

Plots (matplotlib, Agg backend, written under `plots/`): one figure per `Metric.plot` declared in
`trainer.metrics.METRICS` (loss, residual with its noise floor, update cosine per projection,
weight gap, estimator health, stability; panel titles in `PANELS`), and the device conductance
(weight) histograms at start and end. `report.md` states the configuration, the
physics choices of the analog relaxation, the final figures side by side, the validation
text's unigram entropy and the device and periphery parameters the analog path trained with (a
table from the run's own `tile.toml`), and the gap-attribution table and chart of
`ept-hw attribute` when the run has one (`attribution/`). Every table cell is escaped (`experiments.markdown`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tomli_w  # noqa: E402
import torch  # noqa: E402

from trainer.analog import resolve_tile_config  # noqa: E402
from trainer.config import run_config_from_dict  # noqa: E402
from trainer.fidelity import COLLAPSE_BAND, work_per_step  # noqa: E402
from trainer.metrics import Metric, active_paths, aggregate, column, figure_rows, final_figures, plotted  # noqa: E402
from trainer.rundir import RunDirectory  # noqa: E402

from .attribution import PLOT, SUBDIR, TABLE_JSON, markdown  # noqa: E402
from .markdown import table as md_table  # noqa: E402

__all__ = ["write_report", "final_figures"]

PATH_STYLE = {"analog": {"color": "tab:red", "label": "analog"}, "twin": {"color": "tab:blue", "label": "digital twin"}}


def _smooth(values: list[float], k: int) -> list[float]:
    if k <= 1 or len(values) < k:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _finite(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if isinstance(v, (int, float)) and math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Panel:
    """The axes of one report plot panel (which metrics it draws is declared by the metrics
    themselves: `Metric.plot` / `Metric.panel` in `trainer.metrics.METRICS`). A panel that is not
    declared here gets its first metric's label as title and y label. `extra` draws what is not a
    metric (reference lines from the summary)."""

    title: str
    ylabel: str
    ylim: tuple[float, float] | None = None
    hline: float | None = None
    xlabel: str = "step"
    legend_columns: int = 1
    extra: Callable[[Any, Mapping[str, Any]], None] | None = None


def _loss_references(ax, summary: Mapping[str, Any]) -> None:
    entropy, bigram = summary.get("unigram_entropy"), summary.get("bigram_loss")
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label=f"unigram entropy {entropy:.3f}")
        ax.axhline(entropy - 0.3, color="gray", ls=":", lw=1, label="entropy − 0.3 nats")
    if bigram is not None:
        ax.axhline(bigram, color="tab:purple", ls="-.", lw=1, label=f"bigram table {bigram:.3f}")


def _collapse_band(ax, summary: Mapping[str, Any]) -> None:
    for edge in COLLAPSE_BAND:
        ax.axhline(edge, color="tab:red", ls=":", lw=1)


#: (figure, panel) -> its axes; figures are written in this order, then any other declared by a metric.
PANELS: dict[tuple[str, int], Panel] = {
    ("loss", 0): Panel("Loss", "cross-entropy (nats/token)", extra=_loss_references),
    ("residual", 0): Panel("Free-phase residual", "one-step relative residual"),
    ("update_cosine", 0): Panel("Update agreement per projection (5-step mean)", "cos(analog update, twin update)",
                                ylim=(-0.1, 1.05), legend_columns=4),
    ("weight_gap", 0): Panel("Weight gap", "‖W_analog − W_twin‖ / ‖W_twin‖", legend_columns=4),
    ("realised_updates", 0): Panel("Realised updates (analog, simulator-side; 5-step mean)",
                                   "‖ΔW realised‖ / ‖ΔW requested‖", hline=1.0, legend_columns=4),
    ("realised_updates", 1): Panel("Weight norm, analog / twin (dotted: collapse band)", "‖W_analog‖ / ‖W_twin‖",
                                   hline=1.0, legend_columns=4, extra=_collapse_band),
    ("estimator_health", 0): Panel("Estimator health (twin)", "cosine", ylim=(-1.05, 1.05)),
    ("estimator_health", 1): Panel("‖EP gradient‖ / ‖implicit gradient‖", "ratio", hline=1.0),
    ("stability", 0): Panel("Relaxation stability (Re μ < 0: the fixed point attracts)", "leading Re μ of J",
                            hline=0.0, xlabel="step (−1: initial weights; analog: read-out weights)"),
}


def _initial(summary: Mapping[str, Any], key: str | None, path: str) -> Any:
    """`summary[head][path][rest...]` for a dotted `Metric.initial` key, or None."""
    if key is None:
        return None
    head, *rest = key.split(".")
    value = (summary.get(head) or {}).get(path)
    for part in rest:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _series(rows, m: Metric, paths: Sequence[str], summary: Mapping[str, Any]) -> list[tuple[str, dict, list, list]]:
    """(legend, matplotlib style, steps, values) of every line metric `m` draws."""
    legend = m.legend or m.label
    out = []
    if m.scope == "path":
        with_values = [p for p in paths if column(rows, f"{p}_{m.key}")[0]]
        for p in paths:
            key = f"{p}_{m.key}"
            names = _projection_names(rows, key) if any(isinstance(r.get(key), Mapping) for r in rows) else None
            if names is not None:  # per projection (prefixed by the path when more than one logs it)
                prefix = f"{PATH_STYLE[p]['label']} " if len(with_values) > 1 else ""
                out += [(prefix + name, {"alpha": 0.8}, *_per_projection(rows, key, name)) for name in names]
                continue
            s, v = _finite(*column(rows, key))
            init = _initial(summary, m.initial, p)
            if init is not None:
                s, v = [-1] + s, [init] + v  # before the first update
            out.append((f"{PATH_STYLE[p]['label']} {legend}", {"color": PATH_STYLE[p]["color"]}, s, v))
        return out
    if any(isinstance(r.get(m.key), Mapping) for r in rows):
        return [(name, {"alpha": 0.8}, *_per_projection(rows, m.key, name)) for name in _projection_names(rows, m.key)]
    s, v = _finite(*column(rows, m.key))
    return [(legend, {"color": "k", "lw": 2} if m.scope == "cross" else {}, s, v)]


_STYLES = {"line": {"lw": 1}, "points": {"marker": "o", "ms": 3, "lw": 1}, "dashed": {"ls": "--", "lw": 1}}


def _plot_figure(name: str, panels: Mapping[int, Sequence[Metric]], rows, paths, summary, out: Path) -> Path | None:
    """One report figure from its declared metrics; None when none of them has a logged value."""
    drawn = {i: [(m, ser) for m in ms for ser in _series(rows, m, paths, summary)] for i, ms in sorted(panels.items())}
    if not any(ser[2] for series in drawn.values() for _, ser in series):
        return None
    n = len(drawn)
    fig, axes = plt.subplots(1, n, figsize=(7, 4.2) if n == 1 else (5 * n, 4), squeeze=False)
    for ax, (i, series) in zip(axes.flat, drawn.items()):
        ms = panels[i]
        panel = PANELS.get((name, i)) or Panel(ms[0].label, ms[0].label)
        log = any(m.scale == "log" for m in ms)
        for m, (label, style, s, v) in series:
            if log:
                if not any(x > 0 for x in v):
                    continue  # nothing to draw on a log axis (a digital path's zero noise floor)
                v = [max(x, 1e-12) for x in v]
            if s:
                ax.plot(s, _smooth(v, m.smooth), label=label, **{**_STYLES[m.style], **style})
        if log:
            ax.set_yscale("log")
        if panel.hline is not None:
            ax.axhline(panel.hline, color="k", lw=0.8)
        if panel.extra is not None:
            panel.extra(ax, summary)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=panel.legend_columns)
        ax.grid(alpha=0.3, which="both" if log else "major")
    return _save(fig, out / f"{name}.png")


def _plot_metrics(rows, paths, summary: Mapping[str, Any], out: Path) -> list[Path | None]:
    """Every figure the metrics declare (`trainer.metrics.plotted`), the `PANELS` order first."""
    figures = plotted()
    order = list(dict.fromkeys([f for f, _ in PANELS if f in figures] + list(figures)))
    return [_plot_figure(name, figures[name], rows, paths, summary, out) for name in order]


def _per_projection(rows, key: str, name: str) -> tuple[list, list]:
    """Finite (steps, values) of projection `name` in the per-projection dict column `key`."""
    hits = [r for r in rows if r.get(key) and r[key].get(name) is not None]
    return _finite([r["step"] for r in hits], [r[key][name] for r in hits])


def _projection_names(rows, key: str) -> list[str]:
    return next((list(r[key]) for r in rows if r.get(key)), [])


def fidelity_section(rows: Sequence[Mapping[str, Any]], work: Mapping[str, tuple[float, float]] | None = None,
                     adc_per_step: float | None = None) -> list[str]:
    """Report lines: per projection realised vs requested updates, analog/twin weight-norm ratio,
    the twin's weights outside the analog range, saturation; a collapse warning; digital work."""
    names = _projection_names(rows, "analog_realised_ratio") or _projection_names(rows, "weight_norm_ratio")
    if not names:
        return []
    out = ["## Realised updates and mapping (analog path)\n",
           "Realised ΔW = the arrays' weights after − before each update, read exactly from the simulator state (a "
           "simulator-side measurement, not something the chip reads); requested ΔW = −lr·Σδuᵀ. Means over the last "
           "20 steps; norm ratio, out-of-range fraction and saturation at the last probe.\n"]
    table = []
    collapsed = []
    lo, hi = COLLAPSE_BAND
    for name in names:
        ratio = _last_nested(rows, "weight_norm_ratio", name)
        if ratio is not None and not lo <= ratio <= hi:
            collapsed.append((name, ratio))
        table.append([name, _fmt(_mean_nested(rows, "analog_realised_ratio", name)),
                      _fmt(_mean_nested(rows, "analog_realised_cos", name)), _fmt(ratio),
                      _pct(_last_nested(rows, "twin_out_of_range", name)),
                      _pct(_last_nested(rows, "analog_saturation_per_projection", name))])
    out.append(md_table(["projection", "‖ΔW realised‖/‖ΔW requested‖", "cos(realised, requested)",
                         "‖W_analog‖/‖W_twin‖", "twin weights outside the analog range", "devices at a bound"], table))
    if collapsed:
        out.append("\n**Warning: weight collapse.** " + "; ".join(
            f"{n}: the analog weights are {r:.2f}× the twin's norm" for n, r in collapsed)
            + f" (outside [{lo:g}, {hi:g}]). The arrays do not hold what the twin learned there: look at the "
            "realised/requested ratio (asymmetric or clipped pulses) and the out-of-range fraction (mapping).")
    if work:
        ta = sum(a for a, _ in work.values())
        td = sum(d for _, d in work.values())
        out.append("\n### Work per training step, analog arrays vs digital\n")
        out.append("Estimated by formula (`trainer.fidelity.work_per_step`) from the model shape, the batch and the "
                   "mean free-phase and nudge lengths of this run: analog = multiply-adds inside the arrays "
                   "(projection reads); digital = every other operation (multiply-adds and element-wise operations, "
                   "one each): attention's activation products, LayerNorm, softmax and GELU, the AsymEP correction's "
                   "Jᵀv through them, and the stabilisers computed on the read-out weights (weights included). "
                   "Health probes, evaluations and the stability monitor are not included."
                   + ("" if adc_per_step is None else f" Measured ADC conversions per step (all arrays, incl. probes "
                      f"and evaluations): {adc_per_step:,.0f}.") + "\n")
        wrows = [[k, f"{a:.3g}", f"{d:.3g}"] for k, (a, d) in work.items()]
        wrows.append(["**total**", f"{ta:.3g}", f"{td:.3g} ({td / (ta + td):.0%} of all work)" if ta + td else "—"])
        out.append(md_table(["part", "analog MACs", "digital operations"], wrows))
    out.append("")
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def _last_nested(rows, key: str, name: str) -> float | None:
    return next((r[key][name] for r in reversed(rows) if r.get(key) and r[key].get(name) is not None), None)


def _adc_per_step(rows) -> float | None:
    s, v = _finite(*column(rows, "analog_adc_conversions"))
    return (v[-1] - v[0]) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else None


def _plot_conductances(rd: RunDirectory, out: Path) -> Path | None:
    data = rd.read_conductances()
    if data is None:
        return None
    start, end = data.get("start", {}), data.get("end", {})
    if not start or not end:
        return None
    names = list(start)
    cols = min(4, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        a = start[name].reshape(-1).float()
        b = end[name].reshape(-1).float()
        lo = float(torch.minimum(a.min(), b.min()))
        hi = float(torch.maximum(a.max(), b.max()))
        if hi <= lo:
            hi = lo + 1e-6
        ax.hist(a.numpy(), bins=60, range=(lo, hi), alpha=0.5, label="start", color="tab:gray")
        ax.hist(b.numpy(), bins=60, range=(lo, hi), alpha=0.5, label="end", color="tab:red")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Analog device weights ({data.get('quantity', 'weight')}) at start and end", fontsize=10)
    return _save(fig, out / "conductances.png")


def _last(rows, key: str) -> float | None:
    return aggregate(rows, key, "last")


def _mean_last(rows, key: str, n: int = 20) -> float | None:
    if n == 20:
        return aggregate(rows, key, "mean20")
    vals = [r[key] for r in rows if r.get(key) is not None][-n:]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def device_table(rd: RunDirectory, config: Mapping[str, Any]) -> list[list[Any]]:
    """(parameter, value) rows of the analog path's device and periphery: the run's own tile
    (`tile.toml`), else (older runs) resolved from the configuration; [] for a digital run."""
    tile = rd.tile_config()
    if tile is None:
        mode, path = config.get("mode"), config.get("path")
        if not config or not (mode == "compare" or (mode == "ep" and path == "analog")):
            return []

        try:
            tile = resolve_tile_config(run_config_from_dict({"analog": config.get("analog", {})}).analog)
        except Exception:  # noqa: BLE001 - a report never fails on the device section
            return []
    rows: list[list[Any]] = []
    source = (rd.read_provenance().get("device_source") or {}).get("as_given")
    if source is None:
        source = (config.get("analog") or {}).get("device")
    if source is not None:
        rows.append(["source (as given to --device)", source])
    rows.append(["device model", tile.device_config().model])
    rows.append(["differential pair", tile.uses_pair])

    def flat(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                flat(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            rows.append([prefix, _fmt_param(value)])

    data = tile.to_dict()
    data["device"] = tile.device_config().to_dict()
    flat("", data)
    return rows


def _fmt_param(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_param(x) for x in v)
    return str(v)


def _toml_block(config: Mapping[str, Any]) -> str:
    return tomli_w.dumps(dict(config))


def _final_eval_lines(final: Mapping[str, Any] | None, paths: list[str]) -> list[str]:
    """The final figure on the fixed validation set (`trainer.loop.final_evaluation`), with
    standard errors and the corpus baselines scored on the same tokens."""
    if not final:
        return []
    rows = [[PATH_STYLE[p]["label"], f"{final['loss'][p]:.4f} ± {final['stderr'][p]:.4f}",
             f"{final['bigram_loss'] - final['loss'][p]:+.4f}", f"{final['unigram_entropy'] - final['loss'][p]:+.4f}"]
            for p in paths if p in final["loss"]]
    out = [f"\n### On the fixed validation set ({final['tokens']} tokens, {final['windows']} windows of "
           f"{final['seq_len']})\n",
           "The final figure: every path evaluated once at the last step on the same non-overlapping windows "
           "spread evenly over the validation split (± one standard error over "
           f"{final['chunks']} chunks). Bigram table on these tokens: **{final['bigram_loss']:.4f}**, unigram "
           f"entropy of these targets: {final['unigram_entropy']:.4f} nats/token.\n",
           md_table(["path", "validation loss", "bigram − loss", "entropy − loss"], rows)]
    if "gap" in final:
        out.append(f"\nGap analog − twin on this set (paired by chunk): **{final['gap']:+.4f} ± "
                   f"{final['gap_stderr']:.4f} nats**.")
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write `plots/*.png` and `report.md` for the run in `run_dir`; return the report's path."""
    rd = RunDirectory(run_dir)
    run_dir = rd.path
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    rows = rd.read_metrics()
    if not rows:
        raise ValueError(f"{rd.metrics_path} has no rows: nothing to report")
    config = rd.read_config_dict() if rd.config_path.is_file() else {}
    summary = rd.read_summary()
    entropy = summary.get("unigram_entropy")
    bigram = summary.get("bigram_loss")
    paths = active_paths(rows)
    plots_dir = rd.plots_dir
    plots_dir.mkdir(exist_ok=True)
    plots = [*_plot_metrics(rows, paths, summary, plots_dir), _plot_conductances(rd, plots_dir)]
    figures = final_figures(rows)

    lines: list[str] = []
    mode = summary.get("mode", config.get("mode", "?"))
    lines.append(f"# Run report: `{run_dir.name}`\n")
    lines.append(f"Mode: **{mode}**. Steps logged: {rows[-1]['step'] + 1}. "
                 f"Wall time: {_fmt(rows[-1].get('wall_time'))} s.\n")
    event = summary.get("divergence")
    if event:
        lines.append(f"**The run diverged and was stopped** (rule `{event['rule']}`): {event['message']}. "
                     "The last good checkpoint was kept.\n")
    if summary.get("interrupted"):
        lines.append("The run was interrupted by the user (Ctrl-C); a checkpoint was saved.\n")

    lines.append("## Final figures\n")
    final = summary.get("final_eval")
    if final:  # the final figure first; the logged figures below are interim evaluations
        lines.extend(_final_eval_lines(final, paths))
        lines.append("\n### From the run's logs\n")
        lines.append("The validation losses below are the last interim evaluation (a few random validation "
                     "batches, noisier than the fixed set above); the unigram and bigram lines are for the whole "
                     "validation split.\n")
    if entropy is not None:
        lines.append(f"Unigram entropy of the whole validation split: **{entropy:.4f} nats/token** "
                     f"(a model below it has learned context; the acceptance bar is {entropy - 0.3:.4f}).\n")
    if bigram is not None:
        lines.append(f"Bigram table (add-0.05 counts of the training split, scored on the whole validation split): "
                     f"**{bigram:.4f} nats/token** (a model above it has learned less than which token follows "
                     "which).\n")
    fig_rows = [[label, *(_fmt(figures[p][key]) for p in paths)] for key, label in figure_rows()]
    if entropy is not None:
        fig_rows.append(["entropy − validation loss", *(
            _fmt(None if figures[p]["val_loss"] is None else entropy - figures[p]["val_loss"]) for p in paths)])
    if bigram is not None:
        fig_rows.append(["bigram − validation loss", *(
            _fmt(None if figures[p]["val_loss"] is None else bigram - figures[p]["val_loss"]) for p in paths)])
    lines.append(md_table(["figure", *(PATH_STYLE[p]["label"] for p in paths)], fig_rows))
    if "analog" in paths and "twin" in paths:
        va, vt = figures["analog"]["val_loss"], figures["twin"]["val_loss"]
        if va is not None and vt is not None:
            lines.append(f"\nGap analog − twin in the last logged validation loss: **{va - vt:+.4f} nats**.")
        gap = _last(rows, "weight_gap")
        if gap is not None:
            lines.append(f"Final weight gap ‖W_analog − W_twin‖/‖W_twin‖: {_fmt(gap)}.")
        cos = _last(rows, "update_cos")
        if cos:
            lines.append("Mean update cosine per projection over the last 20 logged steps: " + ", ".join(
                f"{n} {_fmt(_mean_nested(rows, 'update_cos', n))}" for n in cos) + ".")
    health = [(k, _mean_last(rows, k, 5)) for k in ("health_cos", "health_norm_ratio", "health_self_coherence")]
    if any(v is not None for _, v in health):
        lines.append("\nEstimator health on the twin (last probes): " + ", ".join(f"{k} {_fmt(v)}" for k, v in health) + ".")
    lines.append("")

    explanation = summary.get("gap_explanation") or (gap_explanation(rows) if "analog" in paths and "twin" in paths else None)
    if explanation:
        lines.append("## Where the gap comes from\n")
        lines.extend(f"- {e}" for e in explanation)
        lines.append("")

    if "analog" in paths:
        work = None
        fa = figures.get("analog", {})
        if config and fa.get("free_steps_last20") is not None:
            tile = rd.tile_config()
            work_cfg = {**config, "tile": tile.to_dict() if tile is not None else {}}
            nudge = _mean_last(rows, "analog_nudge_steps") or config.get("estimator", {}).get("t2", 0)
            try:
                work = work_per_step(work_cfg, fa["free_steps_last20"], nudge)
            except (KeyError, TypeError, ValueError):  # a report never fails on an estimate
                work = None
        lines.extend(fidelity_section(rows, work, _adc_per_step(rows)))

    lines.extend(_attribution_section(rd))

    physics = summary.get("physics")
    if physics:
        lines.append("## Physics choices of the analog path\n")
        lines.extend(f"- {p}" for p in physics)
        lines.append("")

    device_rows = device_table(rd, config)
    if device_rows:
        lines.append("## Device and periphery\n")
        lines.append("The resolved tile configuration the analog path trained with (the run's own copy, "
                     f"`{rd.TILE}`; aihwkit names and meanings).\n")
        lines.append(md_table(["parameter", "value"], device_rows))
        lines.append("")

    lines.append("## Plots\n")
    for p in plots:
        if p is not None:
            lines.append(f"![{p.stem}](plots/{p.name})\n")

    if config:
        lines.append("## Configuration (`config.toml`)\n")
        lines.append("```toml")
        lines.append(_toml_block(config).rstrip())
        lines.append("```\n")

    return rd.write_report("\n".join(lines) + "\n")


def _attribution_section(rd: RunDirectory) -> list[str]:
    """The gap-attribution table and chart of `ept-hw attribute`, when the run has one."""
    path = rd.path / SUBDIR / TABLE_JSON
    if not path.is_file():
        return []
    try:
        table = json.loads(path.read_text())
        text = markdown(table)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return ["## Gap attribution\n", f"`{SUBDIR}/{TABLE_JSON}` is unreadable ({type(exc).__name__}: {exc}).\n"]
    out = ["## Gap attribution\n", f"From `ept-hw attribute` (`{SUBDIR}/`): the analog path re-run with one "
           "non-ideality removed at a time.\n", text]
    if (rd.path / SUBDIR / PLOT).is_file():
        out.append(f"![gap attribution]({SUBDIR}/{PLOT})\n")
    return out


def gap_explanation(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sentences that attribute the analog-twin gap to what the metrics show."""
    out: list[str] = []
    fa, ft = final_figures(rows).get("analog", {}), final_figures(rows).get("twin", {})
    floor, res_a, res_t = fa.get("residual_floor_last20"), fa.get("residual_last20"), ft.get("residual_last20")
    if floor is not None and floor > 0:
        out.append(
            f"Read noise: the analog free phase cannot settle below a residual floor of {floor:.2e} (one-step residual "
            f"from read noise alone); its noise-aware residual is {_fmt(res_a)} against the twin's {_fmt(res_t)}. "
            "The fixed point the arrays reach is blurred by that much, and every read inside the nudge carries it."
        )
    snr = fa.get("adjoint_snr")
    if snr is not None:
        verdict = "the adjoint is dominated by noise" if snr < 1 else ("noisy" if snr < 3 else "usable")
        out.append(f"Adjoint SNR ‖ā‖/spread over repeated nudges: {snr:.2f} ({verdict}); the EP update inherits it "
                   "(raise β, use common random numbers, or average reads to improve it).")
    cos_all = [_mean_nested(rows, "update_cos", n) for n in (rows[-1].get("update_cos") or {})]
    cos_all = [c for c in cos_all if c is not None]
    if cos_all:
        worst = min((_mean_nested(rows, "update_cos", n), n) for n in rows[-1]["update_cos"]
                    if _mean_nested(rows, "update_cos", n) is not None)
        out.append(f"Update agreement: the mean cosine between the analog and twin updates is {sum(cos_all) / len(cos_all):.2f} "
                   f"over the projections (lowest {worst[1]} at {worst[0]:.2f}), so the arrays follow a noisier "
                   "direction than the twin's; both start from the same weights and see the same batches.")
    un_a, un_t = _mean_last(rows, "analog_update_norm"), _mean_last(rows, "twin_update_norm")
    if un_a and un_t:
        ratio = un_a / un_t
        why = ("the excess is noise in the port quantities" if ratio > 1.2 else
               "comparable sizes: the gap is in the direction, not the size" if ratio > 0.8 else
               "the arrays request smaller updates (noisy, partly cancelling port quantities)")
        out.append(f"Requested update size: analog {un_a:.3g} against twin {un_t:.3g} (ratio {ratio:.2f}): {why}.")
    names = _projection_names(rows, "analog_realised_ratio")
    realised = {n: _mean_nested(rows, "analog_realised_ratio", n) for n in names}
    realised = {n: v for n, v in realised.items() if v is not None}
    if realised:
        low, high = min(realised, key=realised.get), max(realised, key=realised.get)
        cos = {n: _mean_nested(rows, "analog_realised_cos", n) for n in realised}
        why = []
        if realised[high] > 1.2:
            why.append(f"above 1 ({high} {realised[high]:.2f}, cos {_fmt(cos[high])}) the realised step is mostly "
                       "noise of the pulsed update (stochastic pulse coincidences, quantised device steps, "
                       "cycle-to-cycle noise), not the requested direction")
        if realised[low] < 0.8:
            why.append(f"below 1 ({low} {realised[low]:.2f}) the devices lose part of every update (asymmetric "
                       "steps, bounds)")
        out.append("Realised vs requested update per step (simulator-side): ‖ΔW realised‖/‖ΔW requested‖ ranges "
                   f"from {realised[low]:.2f} ({low}) to {realised[high]:.2f} ({high})"
                   + ("; " + "; ".join(why) if why else ", close to what was requested") + ".")
    norms = {n: _last_nested(rows, "weight_norm_ratio", n) for n in _projection_names(rows, "weight_norm_ratio")}
    norms = {n: v for n, v in norms.items() if v is not None}
    if norms:
        out.append("Weight norm analog/twin at the last probe: " + ", ".join(f"{n} {v:.2f}" for n, v in norms.items())
                   + ".")
    sat = fa.get("saturation")
    if sat is not None:
        out.append(f"Device saturation: {sat:.2%} of the devices sit at a bound at the end"
                   + (" (bounded devices clip the update)." if sat > 0.01 else " (not a limiting factor here)."))
    gap = _last(rows, "weight_gap")
    if gap is not None:
        first = next((r["weight_gap"] for r in rows if r.get("weight_gap") is not None), None)
        out.append(f"Weight gap ‖W_analog − W_twin‖/‖W_twin‖ = {gap:.3f} at the end: the accumulated effect of "
                   "noisy updates, quantised pulses and device asymmetry"
                   + (f"; it was already {first:.3f} after the first step (programming error and write noise of the "
                      "devices as the read-out weights see them)." if first is not None and first > 0.05 else "."))
    return out


def _mean_nested(rows, key: str, name: str, n: int = 20) -> float | None:
    vals = [r[key][name] for r in rows if r.get(key) and r[key].get(name) is not None][-n:]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None
