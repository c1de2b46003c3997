"""`export_spec`: write `device_spec.json`, `device_spec.md`, `plots/*.png` (and the PDF) for a run or sweep."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.sweep.tables import plot_gaps
from trainer.rundir import atomic_write

from .build import _read_source, build_spec, resolve_tile
from .render import _markdown, _plot_losses, _pulse_response, _retention_markdown, _write_pdf

__all__ = ["ExportResult", "export_spec"]


@dataclass
class ExportResult:
    spec_path: Path
    markdown_path: Path
    pdf_path: Path | None
    plots: list[Path]
    spec: dict[str, Any]



def export_spec(source: str | Path, out_dir: str | Path, *, pdf: bool = False, tolerance: float | None = None,
                pulse_response: bool = True) -> ExportResult:
    """Write `device_spec.json`, `device_spec.md`, `plots/*.png` (and `device_spec.pdf`) into `out_dir`.

    Nothing is written unless the source reads completely and the spec validates.
    """
    source = Path(source)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory for device_spec.json, device_spec.md and plots/")
    if any(part.is_file() for part in out.parents):
        raise ValueError(f"--out {out}: {next(p for p in out.parents if p.is_file())} is a file, not a directory")
    facts = _read_source(source)
    sweep, run = facts
    device_cfg = resolve_tile(run).device_config()
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    figures = None
    if pulse_response:
        figures = _pulse_response(device_cfg, plot_dir / "pulse_response.png")
        if figures is not None:
            plots.append(plot_dir / "pulse_response.png")
    spec = build_spec(source, tolerance=tolerance, response_figures=figures, _facts=facts)
    plots.append(_plot_losses(run, plot_dir / "loss_curves.png"))
    if sweep is not None:
        table = sweep.table
        tol = spec["requirements"]["tolerance"]["value"]
        plots += plot_gaps(table["rows"], list(table["axes"]), tol, out, table.get("base_values") or {})
    spec_path = out / "device_spec.json"
    atomic_write(spec_path, json.dumps(spec, indent=2, allow_nan=False))
    markdown = _markdown(spec, plots, out) + _retention_markdown(run.path)
    md_path = out / "device_spec.md"
    atomic_write(md_path, markdown)
    pdf_path = _write_pdf(spec, markdown, plots, out / "device_spec.pdf") if pdf else None
    return ExportResult(spec_path, md_path, pdf_path, plots, spec)
