"""The datasheet: `device_spec.md` (and the PDF) from a spec mapping; loss and pulse-response plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from experiments.runfacts import RunFacts

def _pulse_response(device_cfg: Any, plot_path: Path, n_devices: int = 256, seed: int = 0) -> dict[str, Any] | None:
    """Run the devices package's pulse-response protocol, plot it, return its derived figures."""
    if getattr(device_cfg, "is_ideal", False):
        return None
    from devices.response import derived_figures, plot_response, run_pulse_response

    response = run_pulse_response(device_cfg, n_devices=n_devices, seed=seed, n_traces=12)
    plot_response(plot_path, response, title=f"pulse response: {device_cfg.model} ({n_devices} sampled devices)")
    return derived_figures(response)


def _plot_losses(run: RunFacts, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for p, color, label in (("analog", "tab:red", "analog"), ("twin", "tab:blue", "digital twin")):
        tr = [(r["step"], r[f"{p}_loss"]) for r in run.rows if r.get(f"{p}_loss") is not None]
        va = [(r["step"], r[f"{p}_val_loss"]) for r in run.rows if r.get(f"{p}_val_loss") is not None]
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.35, lw=0.8, label=f"{label} train")
        if va:
            ax.plot(*zip(*va), "o-", color=color, lw=1.6, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss [nats/token]")
    ax.set_title(f"loss curves: {run.run_id}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _markdown(spec: Mapping[str, Any], plots: Sequence[Path], out_dir: Path) -> str:
    dev, per, der, tr, req, prov = (spec[k] for k in ("device", "periphery", "derived", "training", "requirements", "provenance"))
    src = dev["source"]
    lines = [
        f"# Device specification — {dev['model']} ({dev['class']})",
        "",
        f"Schema {spec['schema_version']}, created {spec['created']} by ept-hw {prov['software']['version']}"
        + (f" (commit {prov['software']['git_commit'][:10]})" if prov["software"].get("git_commit") else "") + ".",
        "",
        "## Where the device description comes from",
        "",
    ]
    if src["kind"] == "preset":
        lines.append(f"Library preset `{src['name']}`: **a stand-in** with aihwkit's published numbers, not a measured device.")
    elif src["kind"] == "fit":
        fe = src.get("fit_error")
        lines.append(f"Fit to the measured trace `{src['name']}` (file `{src['path']}`); fit error: "
                     + (f"{fe['value']:.4g} {fe.get('unit', '')} ({fe['metric']})" if fe else "not stated")
                     + (f"; one-step RMS {fe['step_rms']:.3g} of the mean step" if fe and "step_rms" in fe else "") + ".")
    else:
        lines.append(f"User file `{src['path']}`.")
    lines += ["", "## Training result (base configuration)", "",
              "| figure | value | unit |", "|---|---|---|",
              f"| steps | {tr['steps']} | |"]
    for key in ("analog_final_val_loss", "twin_final_val_loss", "gap", "unigram_entropy"):
        if key in tr:
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(tr[key]['value'])} | {tr[key]['unit']} |")
    lines += ["", "## Requirements", ""]
    if req["rows"]:
        lines += [f"Tolerance: analog − digital validation-loss gap ≤ **{req['tolerance']['value']:g} nats**. "
                  f"Criterion: {req['criterion']}.", "",
                  "| axis | required (weakest passing) | status | base | unit | weaker means | tested (value: gap) |",
                  "|---|---|---|---|---|---|---|"]
        for r in req["rows"]:
            tested = ", ".join(f"{t['value']}: {'diverged' if t['gap'] is None else _fmt(t['gap'])}" for t in r["tested"])
            flag = " (non-monotone)" if r.get("non_monotone") else ""
            lines.append(f"| `{r['axis']}` | **{_fmt(r['required'])}**{flag} | {r['status']} | {_fmt(r.get('base_value'))} "
                         f"| {r['unit']} | {r['weaker_means']} | {tested} |")
    else:
        lines.append(req.get("note", "no requirements"))
    lines += ["", "## Derived figures", "", "| figure | value | unit | how |", "|---|---|---|---|"]
    for name, f in der.items():
        note = f" ({f['note']})" if f.get("note") else ""
        lines.append(f"| {name.replace('_', ' ')} | {_fmt(f['value'])} | {f['unit']} | {f['how']}{note} |")
    lines += ["", "## Device parameters (aihwkit names)", "", "| parameter | value | unit |", "|---|---|---|"]
    for name, p in dev["parameters"].items():
        lines.append(f"| `{name}` | {_fmt(p['value'])} | {p['unit']} |")
    lines += ["", f"## Periphery (mode `{per['mode']}`, update algorithm `{per['algorithm']['name']}`)", "",
              "| group | parameter | value | unit |", "|---|---|---|---|"]
    for group in ("dac", "adc", "read", "update", "other"):
        for name, p in per.get(group, {}).items():
            meaning = f" ({p['meaning']})" if p.get("meaning") else ""
            lines.append(f"| {group} | `{name}` | {_fmt(p['value'])}{meaning} | {p['unit']} |")
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})", ""]
    lines += ["## Provenance", "", "| run | role | config hash |", "|---|---|---|"]
    for r in prov["runs"]:
        lines.append(f"| `{r['run_id']}` | {r['role']} | `{r['config_hash']}` |")
    if prov.get("sweep"):
        s = prov["sweep"]
        lines.append(f"\nSweep `{s['path']}`: {s['points']} points, {s['failed_points']} failed.")
    lines += ["", "Units: " + "; ".join(f"{k}: {v}" for k, v in spec["units_convention"].items()) + "."]
    return "\n".join(lines) + "\n"


def _write_pdf(spec: Mapping[str, Any], markdown: str, plots: Sequence[Path], path: Path) -> Path:
    """The datasheet as a PDF: the text pages of the Markdown, then one page per plot."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    text_lines: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("!["):
            continue
        text_lines.extend(textwrap.wrap(line, 118) or [""])
    per_page = 70
    with PdfPages(path) as pdf:
        for start in range(0, len(text_lines), per_page):
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.04, 0.98, "\n".join(text_lines[start:start + per_page]), va="top", ha="left",
                     family="monospace", fontsize=6.2)
            pdf.savefig(fig)
            plt.close(fig)
        for p in plots:
            fig = plt.figure(figsize=(8.27, 5.8))
            ax = fig.add_axes((0.02, 0.02, 0.96, 0.96))
            ax.imshow(plt.imread(p))
            ax.axis("off")
            pdf.savefig(fig)
            plt.close(fig)
        info = pdf.infodict()
        info["Title"] = f"ept-hw device specification: {spec['device']['model']}"
        info["Creator"] = "ept-hw"
    return path

