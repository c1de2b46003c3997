"""`ept-hw attribute RUN`: the share of a run's analog − twin gap that each non-ideality explains.
Writes RUN/attribution/ (attribution.json, attribution.md, attribution.png, and the engine's
points/, runs/, tiles/); rerunning the same command resumes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm


def register(subparsers: argparse._SubParsersAction) -> None:
    from experiments.attribution import FACTORS

    p = subparsers.add_parser(
        "attribute",
        help="gap attribution: re-run a compare run with one non-ideality removed at a time (several seeds)",
        description="Re-run a finished compare run from its own configuration and tile, for --seeds seeds: in full, "
        "with each factor removed alone, with all removed together, and the twin (shared by every analog run of a "
        "seed). The table gives, per factor, the gap without it and the part of the full gap it explains "
        "(gap_full - gap_without), plus the interaction remainder (gap_full - sum explained - gap_all_removed). "
        "Finished tasks are kept under RUN/attribution/points: rerunning resumes. Factors: "
        + "; ".join(f"{f.name} = {f.meaning}" for f in FACTORS.values()) + ".",
    )
    p.add_argument("run_dir", help="runs/NAME (a finished, non-diverged compare run)")
    p.add_argument("--seeds", type=int, default=2, help="seeds (>= 2: mean and spread); seed 0 is the run's own")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--factors", help="comma-separated factors (default: every factor that applies to the run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--retry-failed", action="store_true", help="rerun tasks that failed before")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from experiments.attribution import choose_factors, attribution_points, attribute_run, check_run

    factors = None
    if args.factors is not None:
        factors = [f.strip() for f in args.factors.split(",") if f.strip()]
    bar = None
    on_record = None
    if not args.no_progress:
        cfg, tile, _ = check_run(args.run_dir)
        chosen, _ = choose_factors(tile, factors, cfg)
        bar = tqdm(total=len(attribution_points(chosen)) * max(args.seeds, 0), desc=f"attribute {args.run_dir}", unit="run",
                   dynamic_ncols=True)

        def on_record(record: dict) -> None:
            bar.update(1)

    try:
        result = attribute_run(args.run_dir, seeds=args.seeds, workers=args.workers, factors=factors,
                               threads=args.threads, retry_failed=args.retry_failed, on_record=on_record)
    except KeyboardInterrupt:
        print(f"interrupted: finished runs are kept under {Path(args.run_dir) / 'attribution' / 'points'}; "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.table))
        return 0
    from experiments.attribution import markdown

    print(markdown(result.table))
    print(f"table: {result.json_path}, {result.md_path}" + (f"; plot: {result.plot_path}" if result.plot_path else ""))
    return 0
