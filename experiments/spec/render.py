"""The datasheet: `device_spec.md` (and the PDF) from a spec mapping; loss and pulse-response plots."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from devices.response import derived_figures, plot_response, run_pulse_response
from experiments.markdown import table
from experiments.runfacts import RunFacts
from trainer.evaluate import read_evaluation, retention_line

def _pulse_response(device_cfg: Any, plot_path: Path, n_devices: int = 256, seed: int = 0) -> dict[str, Any] | None:
    """Run the devices package's pulse-response protocol, plot it, return its derived figures."""
    if getattr(device_cfg, "is_ideal", False):
        return None

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


def _interval(t: Mapping[str, Any]) -> str:
    if t.get("lo") is None or t.get("hi") is None:
        return "— (one seed)" if (t.get("n_seeds") or 0) < 2 else "—"
    return f"[{_fmt(t['lo'])}, {_fmt(t['hi'])}]"


def _requirements_markdown(req: Mapping[str, Any]) -> list[str]:
    lines = [f"Tolerance: analog − digital validation-loss gap ≤ **{req['tolerance']['value']:g} nats**. "
             f"Criterion: {req['criterion']}.", ""]
    rows = []
    for r in req["rows"]:
        flag = " (non-monotone)" if r.get("non_monotone") else ""
        interval = r.get("interval")
        rows.append([f"`{r['axis']}`", f"**{_fmt(r['required'])}**{flag}", r["status"],
                     "—" if not interval else f"[{_fmt(interval['lo'])}, {_fmt(interval['hi'])}]",
                     _fmt(r.get("seeds")), _fmt(r.get("steps")), _fmt(r.get("base_value")), r["unit"],
                     r["weaker_means"]])
    lines += [table(["axis", "required (weakest passing)", "status", "gap 95 % interval [nats]", "seeds", "steps",
                     "base", "unit", "weaker means"], rows), ""]
    for r in req["rows"]:
        lines += [f"### `{r['axis']}`: gap vs value", "", r.get("how") or "", ""]
        tested = [[_fmt(t["value"]), "diverged" if t["gap"] is None else _fmt(t["gap"]), _interval(t),
                   _fmt(t.get("upper")), _fmt(t.get("n_seeds")),
                   t.get("point_status", "ok") if t.get("point_status", "ok") == "ok"
                   else f"**{t['point_status']}** (never passes)", t.get("verdict", "—")]
                  for t in r["tested"]]
        for v in r.get("failed_values") or []:
            tested.append([_fmt(v), "—", "—", "—", "—", "failed or refused before running", "—"])
        lines += [table(["value", "mean gap [nats]", "95 % interval", "upper 95 % bound", "seeds", "point",
                         "verdict"], tested), ""]
    return lines


def _markdown(spec: Mapping[str, Any], plots: Sequence[Path], out_dir: Path) -> str:
    """The datasheet in GitHub-flavoured Markdown; every table cell escaped (`experiments.markdown`)."""
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
    training = [["steps", tr["steps"], ""]]
    for key in ("analog_final_val_loss", "twin_final_val_loss", "gap", "unigram_entropy", "analog_fixed_set_loss",
                "twin_fixed_set_loss", "fixed_set_gap", "fixed_set_bigram", "fixed_set_unigram_entropy"):
        if key in tr:
            note = f" ({tr[key]['note']})" if tr[key].get("note") else ""
            training.append([key.replace("_", " "), _fmt(tr[key]["value"]) + note, tr[key]["unit"]])
    lines += ["", "## Training result (base configuration, seed 0)", "", table(["figure", "value", "unit"], training),
              "", "## Requirements", ""]
    if req["rows"]:
        lines += _requirements_markdown(req)
    else:
        lines += [req.get("note", "no requirements"), ""]
    lines += ["## Derived figures", "",
              table(["figure", "value", "unit", "how"],
                    [[name.replace("_", " "), _fmt(f["value"]), f["unit"],
                      f["how"] + (f" ({f['note']})" if f.get("note") else "")] for name, f in der.items()]),
              "", "## Device parameters (aihwkit names)", "",
              table(["parameter", "value", "unit"], [[f"`{n}`", _fmt(p["value"]), p["unit"]]
                                                     for n, p in dev["parameters"].items()]),
              "", f"## Periphery (mode `{per['mode']}`, update algorithm `{per['algorithm']['name']}`)", "",
              table(["group", "parameter", "value", "unit"],
                    [[group, f"`{n}`", _fmt(p["value"]) + (f" ({p['meaning']})" if p.get("meaning") else ""), p["unit"]]
                     for group in ("dac", "adc", "read", "update", "other") for n, p in per.get(group, {}).items()])]
    if plots:
        lines += ["", "## Plots", ""]
        for p in plots:
            lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})", ""]
    lines += ["", "## Provenance", "",
              table(["run", "role", "config hash"], [[f"`{r['run_id']}`", r["role"], f"`{r['config_hash']}`"]
                                                     for r in prov["runs"]])]
    if prov.get("sweep"):
        s = prov["sweep"]
        lines.append(f"\nSweep `{s['path']}`: {s['points']} points x {s.get('seeds', 1)} seeds, "
                     f"{s['failed_points']} failed or refused, {s.get('degenerate_points', 0)} degenerate or diverged.")
    lines += ["", "Units: " + "; ".join(f"{k}: {v}" for k, v in spec["units_convention"].items()) + "."]
    return "\n".join(lines) + "\n"


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _plain(text: str) -> str:
    """Markdown inline markup and cell escapes removed, for the PDF."""
    return text.replace("\\|", "|").replace("\\\\", "\\").replace("**", "").replace("`", "")


def _blocks(markdown: str) -> list[tuple[Any, ...]]:
    """The datasheet's Markdown as blocks: ("h", level, text), ("p", text), ("table", header, rows), ("img", path)."""
    blocks: list[tuple[Any, ...]] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            blocks.append(("h", level, _plain(line.lstrip("#").strip())))
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [_plain(c.strip()) for c in _CELL_SPLIT.split(lines[i].strip())[1:-1]]
                if not all(set(c) <= set("-: ") for c in cells):
                    rows.append(cells)
                i += 1
            blocks.append(("table", rows[0], rows[1:]))
            continue
        elif line.startswith("!["):
            blocks.append(("img", line[line.index("(") + 1: line.rindex(")")]))
        elif line.strip():
            blocks.append(("p", _plain(line)))
        i += 1
    return blocks


def _write_pdf(spec: Mapping[str, Any], markdown: str, plots: Sequence[Path], path: Path) -> Path:
    """The datasheet as a PDF document: headings, paragraphs, real tables and the figures, laid out on A4
    pages with matplotlib (`PdfPages`). Image paths in the Markdown are relative to `path`'s folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    margin, line_h = 0.06, 0.0125
    width = 1.0 - 2 * margin
    state: dict[str, Any] = {"fig": None, "y": 0.0}

    def new_page() -> None:
        if state["fig"] is not None:
            pdf.savefig(state["fig"])
            plt.close(state["fig"])
        state["fig"] = plt.figure(figsize=(8.27, 11.69))
        state["y"] = 1.0 - margin

    def room(h: float) -> None:
        if state["fig"] is None or state["y"] - h < margin:
            new_page()

    def text(s: str, size: float, weight: str = "normal", wrap: int = 120) -> None:
        wrapped = textwrap.wrap(s, wrap) or [""]
        h = len(wrapped) * line_h * size / 7.0 + 0.006
        room(h)
        state["fig"].text(margin, state["y"], "\n".join(wrapped), va="top", ha="left", fontsize=size, weight=weight)
        state["y"] -= h

    def table_block(header: list[str], rows: list[list[str]]) -> None:
        n = max(len(header), 1)
        wrap = max(8, int(150 / n))
        cells = [[textwrap.fill(c, wrap) for c in r] + [""] * (n - len(r)) for r in rows]
        heights = [max(c.count("\n") + 1 for c in r) if r else 1 for r in cells]
        start = 0
        while start < len(cells) or (start == 0 and not cells):
            avail = state["y"] - margin - line_h * 1.5
            take, used = 0, 0.0
            for hh in heights[start:]:
                if used + hh * line_h > avail and take > 0:
                    break
                used += hh * line_h
                take += 1
            if take == 0 and cells:
                new_page()
                continue
            chunk = cells[start:start + take]
            h = used + line_h * 1.5
            room(h)
            ax = state["fig"].add_axes((margin, state["y"] - h, width, h))
            ax.axis("off")
            if chunk:
                tbl = ax.table(cellText=chunk, colLabels=[textwrap.fill(c, wrap) for c in header], loc="upper left",
                               cellLoc="left", bbox=(0, 0, 1, 1))
                tbl.auto_set_font_size(False)
                tbl.set_fontsize(5.5)
            state["y"] -= h + 0.01
            start += take
            if not cells:
                break

    with PdfPages(path) as pdf:
        for block in _blocks(markdown):
            kind = block[0]
            if kind == "h":
                text(block[2], {1: 14, 2: 11, 3: 9}.get(block[1], 9), "bold", wrap=80)
            elif kind == "p":
                text(block[1], 7)
            elif kind == "table":
                table_block(block[1], block[2])
            elif kind == "img":
                img_path = path.parent / block[1]
                if img_path.is_file():
                    h = 0.38
                    room(h)
                    ax = state["fig"].add_axes((margin, state["y"] - h, width, h))
                    ax.imshow(plt.imread(img_path))
                    ax.axis("off")
                    state["y"] -= h + 0.01
        if state["fig"] is not None:
            pdf.savefig(state["fig"])
            plt.close(state["fig"])
        info = pdf.infodict()
        info["Title"] = f"ept-hw device specification: {spec['device']['model']}"
        info["Creator"] = "ept-hw"
    return path


def _retention_markdown(run_dir: Path) -> str:
    """The retention line ("loss within X nats of t = 0 after T") when `ept-hw evaluate` has
    written an evaluation into the run; empty otherwise. Markdown only: the JSON schema has no
    retention field yet."""
    line = retention_line(read_evaluation(run_dir))
    return f"\n## Retention\n\n{line}\n" if line else ""
