"""`ept-hw compare`: the analog path and its digital twin trained side by side (the main job)."""

from __future__ import annotations

import argparse

from experiments.run_args import add_run_arguments, apply_threads, config_from_args, print_result
from trainer.loop import run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train analog and digital twin side by side by EP",
        description="Analog path (every projection on a simulated crossbar) and digital twin (exact fp32), "
        "from the same initial weights, on the same batches, with the same learning rule. Writes "
        "config.toml, metrics.jsonl, checkpoints and summary.json under --out.",
    )
    add_run_arguments(p)
    p.add_argument("--report", action="store_true", help="write the report (plots, report.md) at the end")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    apply_threads(args)
    if args.out is None:
        raise ValueError("--out runs/NAME is required")
    if not args.resume and args.model is None:
        raise ValueError("--model NAME is required for a new run")
    cfg = config_from_args(args, {"mode": "compare"})
    result = run(cfg, args.out, resume=args.resume, init_ckpt=args.init_ckpt, progress=not args.no_progress)
    print_result(result)
    if args.report:
        from experiments.report import write_report

        print(f"report: {write_report(result.run_dir)}")
    return result.exit_code
