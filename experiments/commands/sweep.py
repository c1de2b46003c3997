"""`ept-hw sweep`: device and periphery tolerance sweeps, each point a short `compare` run per seed."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

from experiments.run_args import free_run_dir, load_config_file, overrides_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    from experiments.sweep.axes import AXES

    p = subparsers.add_parser(
        "sweep",
        help="device/periphery tolerance sweep: short compare runs per seed, gap vs each axis, requirements",
        description="Run a short analog/twin `compare` per point and seed, one axis at a time around the base device "
        "(or a full grid with --grid). Seed k changes the initial weights (not with --init-ckpt), the device-to-device "
        "samples and the noise streams on the same data order; the gap is paired per seed. A requirement is the weakest "
        "tested value whose gap's one-sided upper 95 % bound, and that of every more demanding value, is within "
        "--tolerance. Finished points are kept under --out/points: rerunning the same command resumes (also on "
        "another backend). Writes sweep.csv, sweep.json and plots/gap_vs_AXIS.png. Axes: " + ", ".join(AXES) + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="model preset (e.g. tiny); optional with --config")
    p.add_argument("--device", help="base device: preset name or TOML file ([tile] or [device] table); "
                   "default with --config: its analog.device")
    p.add_argument("--periphery", choices=("default", "perfect"), help="base periphery (default: 'default', or "
                   "the --config file's)")
    p.add_argument("--config", metavar="FILE.toml", help="base run configuration (e.g. a run's own config.toml); "
                   "explicit options and --set override it")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=v1,v2,...", help="a sweep axis (repeatable)")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed analog - twin validation-loss gap [nats]")
    p.add_argument("--seeds", type=int, default=3, help="seeds per point (paired gaps; 95%% intervals need >= 2)")
    p.add_argument("--grid", action="store_true", help="the full grid of all axes instead of one axis at a time")
    p.add_argument("--init-ckpt", help="every point starts from this checkpoint's weights (programmed onto the arrays)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local worker processes, or Ray tasks (pip install 'ept-hw[ray]')")
    p.add_argument("--ray-address", help="address of an existing Ray cluster (with --backend ray; default: start "
                   "a local Ray instance)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (local backend)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--retry-failed", action="store_true", help="rerun points that failed before")
    p.add_argument("--no-re-mu", action="store_true", help="skip the Re mu (leading eigenvalue) column")
    p.add_argument("--list-axes", action="store_true", help="print the axes and the fields they override, then exit")
    p.add_argument("--noise-mode", choices=("fresh", "common"), help="read noise per read, or common ± draws")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded corpus)")
    p.add_argument("--steps", type=int, help="training steps per point")
    p.add_argument("--batch-size", type=int, help="sequences per batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--seed", type=int, help="base seed: seed index 0 of every point (data order of every seed)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any run config key, e.g. training.eval_interval=5")
    p.add_argument("--out", help="sweep directory: a new one, or an existing sweep to resume (default runs/sweep-N)")
    p.add_argument("--json", action="store_true", help="print a JSON summary (rows, requirements) instead of text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _json_safe(x):
    """Strict JSON: non-finite floats become null, paths and other objects strings."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)


def _run(args: argparse.Namespace) -> int:
    from ept_hw.config import ConfigError
    from experiments.sweep import SweepOptions, axis_table, parse_axis, run_device_sweep, sweep_points
    from trainer.config import merge

    if args.list_axes:
        print(axis_table())
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds", args.seeds, "an integer >= 1 (3 gives a 95% interval from paired gaps)")
    base = load_config_file(args.config) if args.config else {}
    analog_base = base.get("analog", {}) if isinstance(base.get("analog"), dict) else {}
    device = args.device or analog_base.get("device")
    periphery = args.periphery or analog_base.get("periphery") or "default"
    if args.model is None and not args.config:
        raise ValueError("--model is required (or a --config run configuration)")
    if device is None:
        raise ValueError("--device is required (or a --config run configuration with analog.device)")
    if args.out is None:
        args.out = str(free_run_dir("sweep"))
    if not args.axis:
        raise ConfigError("--axis", None, "at least one NAME=v1,v2,... (see --list-axes)")
    axes: dict = {}
    for text in args.axis:
        name, values = parse_axis(text)
        if name in axes:
            raise ConfigError("--axis", name, "each axis once")
        axes[name] = values
    for drop in ("mode", "path"):
        base.pop(drop, None)
    overrides = merge(base, overrides_from_args(args))
    overrides.get("analog", {}).pop("device", None)
    overrides.get("analog", {}).pop("periphery", None)
    options = SweepOptions(
        model=args.model, device=device, axes=axes, tolerance=args.tolerance, grid=args.grid, seeds=args.seeds,
        workers=args.workers, periphery=periphery, run_overrides=overrides, init_ckpt=args.init_ckpt,
        retry_failed=args.retry_failed, re_mu=not args.no_re_mu, threads=args.threads, backend=args.backend,
        ray_address=args.ray_address,
    )
    bar = None
    on_record = None
    if not args.no_progress:
        total = (len(sweep_points(axes, grid=args.grid)) + (1 if args.grid else 0)) * args.seeds
        bar = tqdm(total=total, desc=f"sweep {args.out}", unit="task", dynamic_ncols=True)

        def on_record(record: dict) -> None:
            bar.update(1)
            bar.set_postfix(last=f"{record.get('overrides') or 'base'} seed {record.get('seed_index')}: "
                            f"gap {record.get('gap')}")

    try:
        result = run_device_sweep(args.out, options, on_record=on_record)
    except KeyboardInterrupt:
        points = Path(args.out) / "points"
        done = len(list(points.glob("*.json"))) if points.is_dir() else 0
        print(f"interrupted: {done} tasks finished and kept under {points}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(_json_safe({"sweep_dir": str(result.out_dir), "table": str(result.csv_path), "seeds": args.seeds,
                          "tolerance": args.tolerance, "base_values": result.base_values, "rows": result.rows,
                          "requirements": [r.to_dict() for r in result.requirements]})))
        return 0
    bad = [r for r in result.rows if r["status"] != "ok"]
    print(f"sweep directory: {result.out_dir} ({len(result.rows)} points x {args.seeds} seeds, "
          f"{sum(r['status'] in ('failed', 'invalid') for r in result.rows)} failed or invalid, "
          f"{sum(r['status'] in ('degenerate', 'diverged') for r in result.rows)} degenerate or diverged)")
    for r in bad:
        print(f"  {r['status']} point {r['overrides']}: {r['error'] or r.get('degenerate')}")
    print(f"table: {result.csv_path}")
    print(f"requirements (one-sided upper 95% bound of the paired gap <= {args.tolerance:g} nats, other axes at the base):")
    for req in result.requirements:
        tested = ", ".join(f"{t.value}: {'—' if t.gap is None else format(t.gap, '.3f')}"
                           + (f" ±{t.hi - t.gap:.3f}" if t.hi is not None and t.gap is not None else "")
                           + ("" if t.point_status == "ok" else f" [{t.point_status}]") for t in req.tested)
        print(f"  {req.axis:>15}: {'—' if req.required is None else req.required} [{req.unit}] ({req.status}; "
              f"base {result.base_values.get(req.axis)}; tested {tested})")
        print(f"  {'':>15}  {req.how}")
    print(f"next: ept-hw spec export {result.out_dir} --out DIR")
    return 0
