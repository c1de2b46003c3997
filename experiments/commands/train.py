"""`ept-hw train`: one path (EP on the twin or the analog arrays) or a reference (BPTT, BP transformer)."""

from __future__ import annotations

import argparse

from experiments.run_args import add_run_arguments, apply_threads, check_run_target, config_from_args, execute_run


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a single path: EP (digital or analog), BPTT, or a BP transformer",
        description="Single-path training and the references: `--mode ep --optimizer adamw` is the best-digital "
        "EP reference (AdamW, warmup-stable-decay, parameter EMA: --schedule wsd --ema 0.999); `--mode bptt` "
        "backpropagates through the unrolled free phase of the same block with the same stabilisers; "
        "`--mode bp` trains a standard transformer of matched width.",
    )
    add_run_arguments(p)
    p.add_argument("--mode", choices=("ep", "bptt", "bp"), help="default: ep (or --config's)")
    p.add_argument("--path", choices=("twin", "analog"), help="mode ep: digital (twin, default) or analog arrays")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help="default: sgd (or the preset's)")
    p.add_argument("--schedule", choices=("constant", "wsd"), help="learning-rate schedule (default: the preset's; constant in tiny and base)")
    p.add_argument("--warmup", type=int, help="warmup steps of the wsd schedule (default: the preset's)")
    p.add_argument("--ema", type=float, help="parameter EMA decay, 0: off (default: the preset's)")
    p.add_argument("--report", action="store_true", help="write the report at the end")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_run_target(args)
    base: dict = {}
    if args.mode is not None:
        base["mode"] = args.mode
    elif not args.resume and args.config is None:
        base["mode"] = "ep"
    for attr, key in (("path", "path"),):
        if getattr(args, attr) is not None:
            base[key] = getattr(args, attr)
    training: dict = {}
    if args.optimizer is not None:
        training["optimizer"] = args.optimizer
    if args.ema is not None:
        training["ema"] = args.ema
    schedule: dict = {}
    if args.schedule is not None:
        schedule["kind"] = args.schedule
    if args.warmup is not None:
        schedule["warmup_steps"] = args.warmup
    if schedule:
        training["schedule"] = schedule
    if training:
        base["training"] = training
    cfg = config_from_args(args, base)
    return execute_run(args, cfg)
