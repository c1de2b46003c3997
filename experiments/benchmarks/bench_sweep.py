"""Sweep engine scaling and the standard error of the paired gap, measured on tiny runs.

Run by hand:
    python -m experiments.benchmarks.bench_sweep scaling [--steps 3] [--ray]
    python -m experiments.benchmarks.bench_sweep se [--seeds 3] [--steps 5,10,20] [--model tiny]

- scaling: the same 2-point x 2-seed sweep (4 tasks of a `compare` of `--steps` steps) with the
  local backend at 1 and 2 workers (and Ray with `--ray`), each in a fresh directory; prints the
  wall times and the scaling efficiency T1 / (k T_k).
- se: the base point (no axis) with `--seeds` seeds at each number of steps; prints the mean paired
  gap, its standard error, the 95 % interval, the twin's loss against the unigram entropy, and
  whether a 0.05-nat requirement could be "met" at that length (upper bound <= 0.05 and the twin
  0.3 nats below the entropy).
Everything runs on the embedded corpus unless `--data` is given; nothing here is a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from experiments.sweep import SweepOptions, compare_point, gap_stats, run_device_sweep, run_sweep
from experiments.sweep.requirements import TWIN_MARGIN


def _overrides(args: argparse.Namespace, steps: int) -> dict:
    o = {"training": {"steps": steps, "batch_size": args.batch_size, "eval_interval": steps, "eval_batches": 2}}
    if args.data:
        o["data"] = {"source": str(Path(args.data).resolve())}
    return o


def scaling(args: argparse.Namespace) -> None:
    backends = [("local", 1), ("local", 2)] + ([("ray", 2)] if args.ray else [])
    times = {}
    for backend, workers in backends:
        with tempfile.TemporaryDirectory() as tmp:
            opts = SweepOptions(model=args.model, device=args.device, axes={"adc_bits": (8,)}, seeds=2,
                                workers=workers, backend=backend, re_mu=False,
                                run_overrides=_overrides(args, args.steps))
            t0 = time.perf_counter()
            run_device_sweep(Path(tmp) / "s", opts)
            times[(backend, workers)] = time.perf_counter() - t0
            if backend == "ray":
                import ray

                ray.shutdown()
        print(f"{backend:>5} backend, {workers} worker(s): {times[(backend, workers)]:7.1f} s for 4 tasks", flush=True)
    t1 = times[("local", 1)]
    for (backend, workers), t in times.items():
        if workers > 1:
            print(f"scaling efficiency {backend} x{workers}: T1/({workers} T) = {t1 / (workers * t):.2f} "
                  f"(speed-up {t1 / t:.2f})")


def standard_error(args: argparse.Namespace) -> None:
    print(f"{'steps':>6} {'mean gap':>9} {'se':>8} {'95% interval':>20} {'upper':>8} {'twin':>7} {'entropy':>8} "
          f"{'meetable':>9}")
    for steps in [int(s) for s in args.steps_list.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = {"model": args.model, "device": args.device, "periphery": "default",
                   "run_overrides": _overrides(args, steps), "_out_dir": str(Path(tmp).resolve()), "_re_mu": False}
            records = run_sweep(compare_point, [{}], tmp, context=ctx, seeds=list(range(args.seeds)),
                                workers=args.workers)
        s = gap_stats([r["gap"] for r in records if r["status"] == "ok"])
        twin = sum(r["twin_val_loss"] for r in records) / len(records)
        ent = records[0]["unigram_entropy"]
        learned = twin <= ent - TWIN_MARGIN
        meet = learned and s.upper is not None and s.upper <= 0.05
        print(f"{steps:>6} {s.mean:>9.4f} {s.se or float('nan'):>8.4f} "
              f"[{s.lo if s.lo is not None else float('nan'):8.4f}, {s.hi if s.hi is not None else float('nan'):8.4f}] "
              f"{s.upper if s.upper is not None else float('nan'):>8.4f} {twin:>7.3f} {ent:>8.3f} {str(meet):>9}",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("scaling", "se"))
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="ecram")
    p.add_argument("--data", help="UTF-8 text file (default: the embedded corpus)")
    p.add_argument("--steps", type=int, default=3, help="steps per run (scaling)")
    p.add_argument("--steps-list", default="5,10,20", help="run lengths (se)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--ray", action="store_true", help="also time the Ray backend (local instance)")
    args = p.parse_args()

    torch.set_num_threads(1)
    (scaling if args.what == "scaling" else standard_error)(args)


if __name__ == "__main__":
    main()
