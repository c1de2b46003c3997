"""experiments.report: the plots and tables derive from the metric declarations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer import metrics
from trainer.loop import _row
from trainer.twin import StepOutcome


def _write_rows(run_dir, values):
    """A digital run's metrics.jsonl: one row per value of the test metric, as the loop builds it."""
    run_dir.mkdir()
    with metrics.MetricsLog(run_dir / "metrics.jsonl") as log:
        for step, value in enumerate(values):
            outcome = StepOutcome(loss=3.0 - 0.1 * step, residual=1e-3)
            outcome.set_figures({"dummy_flux": value})  # the value's source: a probe's or stabiliser's figures
            vals = {"twin": 2.5} if step == len(values) - 1 else {}
            log.append(_row(step, 0.1, float(step), {"twin": SimpleNamespace(analog=False)}, {"twin": outcome}, vals))


def test_a_new_metric_is_one_declaration_and_reaches_rows_table_and_plots(tmp_path, monkeypatch):
    from experiments.report import write_report

    dummy = metrics.Metric("dummy_flux", "a test figure", "dummy flux", aggregate="last", plot="dummy_plot", scale="log")
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS + (dummy,))
    run = tmp_path / "run"
    _write_rows(run, [10.0 ** -s for s in range(6)])
    rows = metrics.read_metrics(run / "metrics.jsonl")
    assert list(rows[0]) == list(metrics.row_keys()) and "twin_dummy_flux" in rows[0]
    assert rows[-1]["twin_dummy_flux"] == pytest.approx(1e-5)
    report = write_report(run).read_text()
    assert "| dummy flux | 1.000e-05 |" in report  # the final-figures table, aggregated as declared
    assert "![dummy_plot](plots/dummy_plot.png)" in report
    assert (run / "plots" / "dummy_plot.png").stat().st_size > 5000
    assert (run / "plots" / "loss.png").is_file()  # the declared figures are still drawn


def test_a_metric_without_values_draws_no_figure_and_an_undeclared_figure_is_refused(tmp_path, monkeypatch):
    from experiments.report import write_report

    dummy = metrics.Metric("dummy_flux", "a test figure", "dummy flux", plot="dummy_plot")
    monkeypatch.setattr(metrics, "METRICS", metrics.METRICS + (dummy,))
    run = tmp_path / "run"
    _write_rows(run, [None] * 3)
    write_report(run)
    assert not (run / "plots" / "dummy_plot.png").exists()
    assert (run / "plots" / "loss.png").is_file()
    monkeypatch.undo()
    with pytest.raises(KeyError, match="dummy_flux"):
        StepOutcome(loss=0.0, residual=0.0).set_figures({"dummy_flux": 1.0})
    with pytest.raises(ValueError, match="scale"):
        metrics.Metric("x", "x", "x", scale="cubic")
