"""`ept-hw demo`: the README's main job: a short `compare` on the embedded corpus with a realistic
device, then the report."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_PRESET = "demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job: a short analog-vs-twin run on the embedded corpus, with its report",
        description="Runs `compare --model demo` (a realistic device preset, see experiments/presets/demo.toml) "
        "on the embedded Shakespeare corpus and writes the report (runs/demo*/report.md).",
    )
    p.add_argument("--out", help="run directory (default: the first free runs/demo, runs/demo-1, ...)")
    p.add_argument("--steps", type=int, help="override the preset's step count")
    p.add_argument("--device", help="override the preset's device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from experiments.run_args import add_serial_argument, add_threads_argument

    add_threads_argument(p)
    add_serial_argument(p)
    p.set_defaults(func=_run)


def _free_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 1
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def _run(args: argparse.Namespace) -> int:
    from experiments.report import write_report
    from experiments.run_args import apply_threads, print_result
    from experiments.presets import load_run_config
    from trainer.loop import run

    apply_threads(args)
    overrides: dict = {"mode": "compare"}
    if args.steps is not None:
        overrides["training"] = {"steps": args.steps}
    if args.device is not None:
        overrides["analog"] = {"device": args.device}
    cfg = load_run_config(DEMO_PRESET, overrides)
    out = Path(args.out) if args.out else _free_dir(Path("runs") / "demo")
    result = run(cfg, out, progress=not args.no_progress, parallel_paths=not args.serial)
    print_result(result)
    report = write_report(result.run_dir)
    s = result.summary
    # the unigram entropy of the tokens the final losses were scored on (the fixed set when there is one)
    entropy = (s.get("final_eval") or {}).get("unigram_entropy", s.get("unigram_entropy"))
    for path, v in (s.get("final_val_loss") or {}).items():
        if entropy is not None:
            print(f"{path}: validation loss {v:.4f} = unigram entropy {entropy:.4f} - {entropy - v:.4f} nats")
    print(f"report: {report}")
    return result.exit_code
