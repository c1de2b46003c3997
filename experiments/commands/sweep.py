"""`ept-hw sweep`: device and periphery tolerance sweeps, each point a short `compare` run."""

from __future__ import annotations

import argparse

from experiments.run_args import overrides_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from experiments.sweep import AXES

    p = subparsers.add_parser(
        "sweep",
        help="device/periphery tolerance sweep: short compare runs, gap vs each axis, requirements",
        description="Run a short analog/twin `compare` per point (same seed, data and generators: common random "
        "numbers across points), one axis at a time around the base device (or a full grid with --grid). "
        "Finished points are kept under --out/points: rerunning the same command resumes. Writes sweep.csv, "
        "sweep.json, plots/gap_vs_AXIS.png and the derived requirements. Axes: " + ", ".join(AXES) + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model preset (e.g. tiny)")
    p.add_argument("--device", help="base device: preset name or TOML file ([tile] or [device] table)")
    p.add_argument("--periphery", choices=("default", "perfect"), default="default", help="base periphery")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=v1,v2,...", help="a sweep axis (repeatable)")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed analog - twin validation-loss gap [nats]")
    p.add_argument("--grid", action="store_true", help="the full grid of all axes instead of one axis at a time")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--retry-failed", action="store_true", help="rerun points that failed before")
    p.add_argument("--no-re-mu", action="store_true", help="skip the Re mu (leading eigenvalue) column")
    p.add_argument("--list-axes", action="store_true", help="print the axes and the fields they override, then exit")
    p.add_argument("--noise-mode", choices=("fresh", "common"), help="read noise per read, or common ± draws")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded corpus)")
    p.add_argument("--steps", type=int, help="training steps per point")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, help="one seed for every point (common random numbers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run config key, e.g. training.eval_interval=5")
    p.add_argument("--out", help="sweep directory (runs/sweep)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ept_hw.config import ConfigError
    from experiments.sweep import SweepOptions, axis_table, parse_axis, run_device_sweep

    if args.list_axes:
        print(axis_table())
        return 0
    for flag in ("model", "device", "out"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag} is required")
    if not args.axis:
        raise ConfigError("--axis", None, "at least one NAME=v1,v2,... (see --list-axes)")
    axes: dict = {}
    for text in args.axis:
        name, values = parse_axis(text)
        if name in axes:
            raise ConfigError("--axis", name, "each axis once")
        axes[name] = values
    overrides = overrides_from_args(args)
    overrides.get("analog", {}).pop("device", None)
    overrides.get("analog", {}).pop("periphery", None)
    bar = None
    on_record = None
    if not args.no_progress:
        from tqdm import tqdm

        from experiments.sweep import sweep_points

        total = len(sweep_points(axes, grid=args.grid)) + (1 if args.grid else 0)
        bar = tqdm(total=total, desc=f"sweep {args.out}", unit="point", dynamic_ncols=True)

        def on_record(record: dict) -> None:
            bar.update(1)
            bar.set_postfix(last=f"{record.get('overrides') or 'base'}: gap {record.get('gap')}")

    from pathlib import Path

    try:
        options = SweepOptions(
            model=args.model, device=args.device, axes=axes, tolerance=args.tolerance, grid=args.grid,
            workers=args.workers, periphery=args.periphery, run_overrides=overrides, retry_failed=args.retry_failed,
            re_mu=not args.no_re_mu, threads=args.threads,
        )
        result = run_device_sweep(args.out, options, on_record=on_record)
    except KeyboardInterrupt:
        points = Path(args.out) / "points"
        done = len(list(points.glob("*.json"))) if points.is_dir() else 0
        print(f"interrupted: {done} points finished and kept under {points}; rerun the same command to resume")
        return 130
    finally:
        if bar is not None:
            bar.close()
    failed = [r for r in result.rows if r["status"] != "ok"]
    print(f"sweep directory: {result.out_dir} ({len(result.rows)} points, {len(failed)} failed)")
    for r in failed:
        print(f"  failed point {r['overrides']}: {r['error']}")
    print(f"table: {result.csv_path}")
    print(f"requirements (gap <= {args.tolerance:g} nats, other axes at the base):")
    for req in result.requirements:
        tested = ", ".join(f"{v}: {'diverged' if g is None else format(g, '.3f')}" for v, g in req.tested)
        print(f"  {req.axis:>15}: {'—' if req.required is None else req.required} [{req.unit}] ({req.status}; "
              f"base {result.base_values.get(req.axis)}; tested {tested})")
    print(f"next: ept-hw spec export {result.out_dir} --out DIR")
    return 0
