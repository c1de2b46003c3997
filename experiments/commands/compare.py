"""`ept-hw compare`: the analog path and its digital twin trained side by side (the main job)."""

from __future__ import annotations

import argparse

from experiments.run_args import add_run_arguments, apply_threads, check_run_target, config_from_args, execute_run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train analog and digital twin side by side by EP",
        description="Analog path (every projection on a simulated crossbar) and digital twin (exact fp32), "
        "from the same initial weights, on the same batches, with the same learning rule. Writes "
        "config.toml, tile.toml (the device as trained), provenance.json, metrics.jsonl, checkpoints and "
        "summary.json under --out (default: the first free runs/compare-N).",
    )
    add_run_arguments(p)
    p.add_argument("--report", action="store_true", help="write the report (plots, report.md) at the end")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_run_target(args)
    cfg = config_from_args(args, {"mode": "compare"})
    return execute_run(args, cfg)
