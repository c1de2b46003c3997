"""`ept-hw report runs/NAME`: PNG plots and report.md for a run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write plots and report.md for a run",
        description="Plots (losses, residual and floor, update cosines, weight gap, estimator health, device "
        "weight histograms) under RUN/plots and RUN/report.md with the configuration, the physics choices "
        "and the final figures side by side.",
    )
    p.add_argument("run_dir", help="runs/NAME")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from experiments.report import write_report

    print(write_report(args.run_dir))
    return 0
